#!/usr/bin/env bash
# Creates .venv (unless it exists) and installs fairchem-equiformers with everything it needs,
# including torch-scatter and torch-sparse, which fairchem-core 1.10 imports but which exist
# only as source packages: they are built against the installed torch. CPU kernels by default;
# FORCE_CUDA=1 builds the CUDA kernels (needs a CUDA toolkit matching torch's, 12.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PY -m pip install --quiet --upgrade pip wheel setuptools ninja
$PY -m pip install --quiet -e ".[test]"
if ! $PY -c "import torch_scatter, torch_sparse" 2>/dev/null; then
  echo "building torch-scatter and torch-sparse against torch $($PY -c 'import torch; print(torch.__version__)') (a few minutes)"
  [ "${FORCE_CUDA:-0}" = "1" ] || export FORCE_ONLY_CPU=1
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY -m pip install --quiet --no-build-isolation \
    torch-scatter==2.1.2 torch-sparse==0.6.18
fi
$PY -c "import fairchem_equiformers, torch_scatter, torch_sparse; print('fairchem-equiformers', fairchem_equiformers.__version__, 'installed')"
