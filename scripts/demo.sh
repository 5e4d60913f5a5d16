#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), then runs the demo: builds the embedded EMT dataset,
# trains a small EquiformerV2 on the CPU with the stock fairchem CLI, validates, predicts, writes
# an EvalAI submission file and runs a relaxation and NVE MD through ASE. Outputs: runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" .venv/bin/python -m fairchem_equiformers.tools.demo "$@"
