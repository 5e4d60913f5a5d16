"""``keep_freed_memory``: glibc keeps freed memory, so a repeated large allocation stops
page-faulting; ``optim.keep_freed_memory`` switches it on for the trainer. (Its speed on model
steps: ``benchmarks/bench_allocator.py``.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fairchem_equiformers.training import trainer as trainer_module

from .test_training import make_trainer, trainer_config

# Allocates and frees a 256 MB tensor 6 times: the minor page faults of the last 5 (a fresh
# mmap's 65,536 pages each under glibc's defaults; none once the memory is kept).
FAULTS = """
import json, resource, sys, torch
from fairchem_equiformers import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.empty(1 << 26).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(1 << 26).fill_(1.0)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux) only")
def test_keep_freed_memory_stops_page_faults_of_repeated_allocations():
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nMEASURED minor page faults of 5 x 256 MB: default {runs['default']['faults']}, "
          f"kept {runs['keep']['faults']}")  # fmt: skip
    assert runs["keep"]["applied"] is True
    # measured 2026-12-06: default 327,685 (5 x 65,536 + a few), kept 0
    assert runs["default"]["faults"] > 5 * 60_000 and runs["keep"]["faults"] < 1_000


def test_keep_freed_memory_argument_is_checked():
    from fairchem_equiformers import keep_freed_memory

    with pytest.raises(ValueError, match="top_pad_mb"):
        keep_freed_memory(top_pad_mb=4096)


def test_trainer_key_keeps_freed_memory_before_the_model_is_built(emt_database, tmp_path, monkeypatch):
    calls = []
    load_model = trainer_module.ForcesTrainer.load_model
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(
        trainer_module.ForcesTrainer, "load_model", lambda self: (calls.append("model"), load_model(self))
    )
    with make_trainer(tmp_path, trainer_config(emt_database, keep_freed_memory=True), "keep"):
        pass
    assert calls == ["keep", "model"]
    calls.clear()
    with make_trainer(tmp_path, trainer_config(emt_database), "default"):
        pass
    assert calls == ["model"]
