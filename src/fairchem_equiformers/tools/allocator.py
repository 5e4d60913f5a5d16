"""Keeping freed memory in the process, so that large steps on the CPU do not page-fault anew.

glibc's ``malloc`` gives every allocation above its threshold (at most 32 MB) a fresh ``mmap``
and unmaps it on ``free``; the kernel then zeroes every page again on first touch. A model's
per-edge tensors are hundreds of megabytes at a few hundred atoms, so each step pays for zeroing
its whole working set (``benchmarks/bench_allocator.py``: an EquiformerV3 gradient step on 255
atoms spent most of its time there). :func:`keep_freed_memory` serves every allocation from the
heap and never returns freed memory to the system, so repeated steps of one size (MD, relaxation,
training) reuse the same pages once the heap has settled (the first two or three steps may still
land on fresh pages, behind small blocks allocated in between). The price: the process keeps its
peak memory, plus what heap fragmentation adds, until it exits; a larger system or another model
run next can need its own peak on top (kept blocks too small for its tensors stay unused).
"""

from __future__ import annotations

import ctypes
import logging
import sys

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4


def keep_freed_memory(top_pad_mb: int = 1024) -> bool:
    """Tell glibc's ``malloc`` to keep freed memory for reuse for the rest of the process: no
    ``mmap`` per large allocation (``M_MMAP_MAX = 0``), no trimming of the heap's top
    (``M_TRIM_THRESHOLD = -1``), and the heap grown ``top_pad_mb`` at a time. Call it once, before
    the first large step (MD, relaxation, a training run on the CPU); ``optim.keep_freed_memory:
    true`` does it for :class:`fairchem_equiformers.ForcesTrainer`. Returns whether it took effect:
    ``False`` (with a warning) where the C library is not glibc (macOS, Windows, musl)."""
    if not 0 <= top_pad_mb < 2048:
        raise ValueError(f"keep_freed_memory: top_pad_mb must be in [0, 2048), got {top_pad_mb}")
    try:
        libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        logging.warning("keep_freed_memory: the C library is not glibc; memory is managed as before")
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, top_pad_mb << 20))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
