#!/usr/bin/env bash
# Creates benchmarks/.venv-mace (unless it works already): MACE (mace-torch) in its own virtualenv,
# because it pins e3nn 0.4.4 while fairchem-equiformers needs e3nn 0.6. Same torch as the project's
# venv (2.4.1), so both sides of benchmarks/bench_real_data.py run the same CPU kernels. Prints the
# venv's python. bench_real_data.py runs this on first use; running it by hand is also fine:
#   bash benchmarks/mace_env.sh
set -euo pipefail
cd "$(dirname "$0")"
MACE_VERSION="${MACE_VERSION:-0.3.16}"
TORCH_VERSION="${TORCH_VERSION:-2.4.1}"
VENV=.venv-mace
PY="$VENV/bin/python"
check() {
  "$PY" -c "import mace, torch, e3nn; from mace.calculators import MACECalculator" 2>/dev/null \
    && [ -x "$VENV/bin/mace_run_train" ] && [ -x "$VENV/bin/mace_eval_configs" ]
}
if ! check; then
  echo "creating benchmarks/$VENV (mace-torch $MACE_VERSION, torch $TORCH_VERSION; a few minutes)" >&2
  [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  "$PY" -m pip install --quiet --upgrade pip wheel >&2
  "$PY" -m pip install --quiet "mace-torch==$MACE_VERSION" "torch==$TORCH_VERSION" >&2
  check || { echo "benchmarks/$VENV: mace-torch does not import" >&2; exit 1; }
fi
"$PY" -c "import mace, torch, e3nn, sys; print(f'mace-torch {mace.__version__}, torch {torch.__version__}, e3nn {e3nn.__version__}', file=sys.stderr)"
echo "$(pwd)/$PY"
