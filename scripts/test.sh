#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the test suite: every test except the long
# report-style runs marked `slow` (run those with `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the official EquiformerV3, the test oracle of tests/test_equiformer_v3_parity.py: without its
# declared requirements (torch 2.9 and CUDA builds of torch-scatter), which must never replace ours
.venv/bin/python -m pip install --quiet --no-deps equiformer-v3==0.0.3
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" .venv/bin/python -m pytest -ra -m "not slow" "$@"
