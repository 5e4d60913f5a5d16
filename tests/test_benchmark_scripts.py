"""Every benchmark script loads and parses its arguments in this environment (``--help``), so
that none rots between the sessions that run it (``benchmarks/gpu_check.sh`` runs two of them
at smoke size: ``tests/test_gpu_check.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# runs in the MACE environment only (benchmarks/mace_env.sh), where this package is absent
OTHER_ENVIRONMENT = {"mace_predict.py"}

HELP_OF_EACH = """
import contextlib, io, json, runpy, sys, traceback
failures = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            runpy.run_path(path, run_name="__main__")
        failures[path] = "no --help: ran to the end"
    except SystemExit as exit:
        if exit.code not in (0, None) or "usage:" not in out.getvalue():
            failures[path] = f"exit {exit.code}: {out.getvalue()[-500:]}"
    except BaseException:
        failures[path] = traceback.format_exc()[-2000:]
print(json.dumps(failures))
"""


def test_every_benchmark_script_loads_and_prints_its_help():
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if p.name not in OTHER_ENVIRONMENT)
    assert len(scripts) >= 14
    command = [sys.executable, "-c", HELP_OF_EACH, *map(str, scripts)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=BENCHMARKS)
    assert run.returncode == 0, run.stderr[-3000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{Path(p).name}: {why}" for p, why in failures.items())
