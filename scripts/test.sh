#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" .venv/bin/python -m pytest -ra "$@"
