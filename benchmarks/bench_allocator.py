"""The memory allocator's share of a large step: one EquiformerV3 gradient-force step (the MPtrj
config, energy and -dE/dpos forces) on periodic water boxes, each in a fresh process, with glibc's
default ``malloc`` and with glibc told to keep freed memory (``KEEP_FREED`` below: no ``mmap`` per
large tensor, no trimming), so that a step does not page-fault its per-edge tensors anew. Prints
seconds per step (after one warm-up step), peak resident memory, and the ratios.

    python benchmarks/bench_allocator.py --molecules 21 85 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP_FREED = {
    "MALLOC_MMAP_THRESHOLD_": str(16 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def worker(molecules: int, precision: str, threads: int) -> dict:
    import torch
    import yaml
    from bench_md import MODELS, water_box
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    from fairchem_equiformers import EquiformerV3

    torch.set_num_threads(threads)
    path, overrides, _ = MODELS["EquiformerV3"]
    config = {**yaml.safe_load((ROOT / path).read_text())["model"], **overrides}
    config.pop("name")
    atoms = water_box(molecules)
    batch = data_list_collater([AtomsToGraphs(r_edges=False, r_pbc=True).convert(atoms)])
    torch.manual_seed(0)
    model = EquiformerV3(**config, precision=precision).eval()
    model(batch)  # warm-up
    start = time.perf_counter()
    model(batch)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"atoms": len(atoms), "seconds": seconds, "peak_gb": peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--molecules", type=int, nargs="+", default=[21, 85], help="water molecules per box")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.precision, args.threads)))
        return
    print(f"EquiformerV3 (MPtrj config) gradient step, {args.precision}, {args.threads} threads")
    print("| atoms | glibc default s | keep freed s | speed-up | peak GB default | peak GB keep freed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for molecules in args.molecules:
        runs = {}
        for name, extra in (("default", {}), ("keep", KEEP_FREED)):
            cmd = [sys.executable, __file__, "--worker", str(molecules), "--precision", args.precision,
                   "--threads", str(args.threads)]  # fmt: skip
            env = {**os.environ, **extra, "PYTHONPATH": str(Path(__file__).parent)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            runs[name] = json.loads(out.strip().splitlines()[-1])
        d, k = runs["default"], runs["keep"]
        speed_up = d["seconds"] / k["seconds"]
        print(f"| {d['atoms']} | {d['seconds']:.2f} | {k['seconds']:.2f} | x{speed_up:.2f} "
              f"| {d['peak_gb']:.1f} | {k['peak_gb']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
