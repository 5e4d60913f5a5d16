"""Splitting rows (edges, nodes) into consecutive blocks of bounded size."""

from __future__ import annotations

import torch


def row_blocks(num_rows: int, row_size: int, budget: int) -> list[slice]:
    """Consecutive slices covering ``num_rows`` rows of ``row_size`` each (any unit), every
    slice holding at most ``budget`` of that unit, and at least one row; no rows: one empty
    slice (so a loop over the blocks always produces one, possibly empty, result). Under
    ``torch.compile``, one block: the compiler plans the memory, and a loop over a symbolic row
    count (``dynamic=True``) would fix the count."""
    if torch.compiler.is_compiling():
        return [slice(None)]
    if num_rows == 0:
        return [slice(0, 0)]
    step = max(1, budget // max(row_size, 1))
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]
