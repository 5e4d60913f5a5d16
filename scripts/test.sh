#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the test suite: every test except the long
# report-style runs marked `slow` (run those with `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" .venv/bin/python -m pytest -ra -m "not slow" "$@"
