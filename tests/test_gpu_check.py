"""``benchmarks/gpu_check.sh --cpu``: the one-command GPU check runs its steps on the CPU at smoke
size, so that it cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_the_cpu_and_prints_one_table():
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout[run.stdout.index("## GPU check: CPU") :]
    rows = table.splitlines()
    comparisons = [row for row in rows if row.startswith("| EquiformerV2 vs fairchem")]
    md_steps = [row for row in rows if row.startswith("| MD step")]
    # fp32 and bf16, inference and training; MD: EquiformerV2 gradient and direct, fp32 and bf16
    assert len(comparisons) == 4 and len(md_steps) == 4, table
