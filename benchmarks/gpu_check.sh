#!/usr/bin/env bash
# The GPU checks in one command (about 8 minutes on one GPU): the GPU tests (AMP training through
# fairchem's --amp and GradScaler; autocast and compile checks), the EquiformerV2 benchmark
# against fairchem's model in fp32, bf16 and fp16 autocast, and the MD benchmark; then one table.
#   bash benchmarks/gpu_check.sh          # on a GPU machine: put the table in docs/benchmarks.md
#   bash benchmarks/gpu_check.sh --cpu    # the same steps on the CPU at smoke size (the tiny model,
#                                         # 63 atoms), so that the script cannot rot (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
if [ "${1:-}" = "--cpu" ]; then
  # fp16 has no matrix units on this kind of CPU (an 82-atom tiny step takes minutes): fp32, bf16
  DEVICE=cpu; MODEL=tiny; STRUCTURES=1; REPEATS=1; PRECISIONS="fp32 bf16"; MD=(--quick --models EquiformerV2); TESTS="amp_training_on_gpu"
else
  DEVICE=cuda; MODEL=31M; STRUCTURES=2; REPEATS=3; PRECISIONS="fp32 bf16 fp16"; MD=(--models EquiformerV2 EquiformerV3 E2Former --max-step-seconds 5)
  TESTS="amp_training_on_gpu or autocast or dynamo or compile"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
RESULTS="$(mktemp -d)/gpu_check.jsonl"
echo "== GPU tests ($TESTS)"
$PY -m pytest -q -rs -p no:cacheprovider tests/test_training.py tests/test_equiformer_v3.py -k "$TESTS"
for precision in $PRECISIONS; do
  echo "== EquiformerV2 $MODEL against fairchem's, $precision"
  $PY benchmarks/bench_equiformer_v2.py --device "$DEVICE" --model "$MODEL" --precision "$precision" \
    --structures "$STRUCTURES" --repeats "$REPEATS" --threads "${OMP_NUM_THREADS:-2}" --json "$RESULTS"
done
echo "== MD through OCPCalculator"
$PY benchmarks/bench_md.py --device "$DEVICE" --threads "${OMP_NUM_THREADS:-2}" "${MD[@]}" --json "$RESULTS"
$PY - "$RESULTS" "$DEVICE" <<'PYTHON'
import json, sys
import torch
rows = [json.loads(line) for line in open(sys.argv[1])]
card = torch.cuda.get_device_name() if sys.argv[2] == "cuda" else "CPU"
print(f"\n## GPU check: {card}, torch {torch.__version__}\n")
print("| benchmark | model | precision | mode / atoms | ours s | reference s | speed-up | memory ours/ref |")
print("|---|---|---|---|---:|---:|---:|---:|")
for r in rows:
    if r["benchmark"] == "EquiformerV2":
        print(f"| EquiformerV2 vs fairchem | {r['model']} | {r['precision']} | {r['mode']} | {r['ours']:.4f} | "
              f"{r['reference']:.4f} | x{r['speed-up']:.2f} | x{r['memory ratio']:.2f} |")
    elif "seconds" in r:
        print(f"| MD step ({r['forces']} forces) | {r['model']} | {r['precision']} | {r['atoms']} atoms | "
              f"{r['seconds']:.4f} | | {1 / r['seconds']:.1f} steps/s | |")
PYTHON
