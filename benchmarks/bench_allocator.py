"""The memory allocator's share of a large step: one step of a family's MD-sized model
(``bench_md.py``'s configs, forces as each config gives them; ``--model``, default EquiformerV3's
gradient-force MPtrj config; ``--mode training`` adds a loss and its backward) on periodic water
boxes, each in a fresh process, with glibc's default ``malloc`` and after
``fairchem_equiformers.keep_freed_memory()`` (no ``mmap`` per large tensor, no trimming), so that a
step does not page-fault its per-edge tensors anew. Prints seconds per step (the best of
``--repeats`` after one warm-up step), peak resident memory, and the ratios.

    python benchmarks/bench_allocator.py --molecules 21 85 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from bench_md import PRECISION_KEY

ROOT = Path(__file__).resolve().parents[1]


def worker(molecules: int, args) -> dict:
    import torch
    import yaml
    from bench_md import MODELS, water_box
    from bench_neighbors import best_of
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    import fairchem_equiformers
    from fairchem_equiformers import keep_freed_memory

    if args.keep_freed:
        assert keep_freed_memory()
    torch.set_num_threads(args.threads)
    path, overrides, _ = MODELS[args.model]
    config = {**yaml.safe_load((ROOT / path).read_text())["model"], **overrides}
    cls = getattr(fairchem_equiformers, config.pop("name").split(".")[-1])
    if args.precision != "fp32":
        config["precision"] = args.precision
    atoms = water_box(molecules)
    batch = data_list_collater([AtomsToGraphs(r_edges=False, r_pbc=True).convert(atoms)])
    torch.manual_seed(0)
    model = cls(**config).train(args.mode == "training")

    def step():  # as a calculator calls the model (gradients on: forces may be -dE/dpos)
        out = model(batch)
        if args.mode == "training":
            model.zero_grad(set_to_none=True)
            (out["energy"].abs().mean() + 100 * out["forces"].norm(dim=-1).mean()).backward()

    step()  # warm-up
    seconds, _ = best_of(step, args.repeats)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"atoms": len(atoms), "seconds": seconds, "peak_gb": peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--molecules", type=int, nargs="+", default=[21, 85], help="water molecules per box")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--model", choices=["EquiformerV2", "EquiformerV1", "E2Former", "EquiformerV3"],
                        default="EquiformerV3")  # fmt: skip
    parser.add_argument("--mode", choices=["inference", "training"], default="inference")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keep-freed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision == "bf16" and args.model not in PRECISION_KEY:
        parser.error(f"--precision bf16: {args.model} has no precision key; use --precision fp32")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    print(f"{args.model} (bench_md.py's config) {args.mode} step, {args.precision}, {args.threads} threads")
    print("| atoms | glibc default s | keep freed s | speed-up | peak GB default | peak GB keep freed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for molecules in args.molecules:
        runs = {}
        for name, extra in (("default", []), ("keep", ["--keep-freed"])):
            cmd = [sys.executable, __file__, "--worker", str(molecules), "--precision", args.precision,
                   "--threads", str(args.threads), "--mode", args.mode, "--repeats", str(args.repeats),
                   "--model", args.model,
                   *extra]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            runs[name] = json.loads(out.strip().splitlines()[-1])
        d, k = runs["default"], runs["keep"]
        speed_up = d["seconds"] / k["seconds"]
        print(f"| {d['atoms']} | {d['seconds']:.2f} | {k['seconds']:.2f} | x{speed_up:.2f} "
              f"| {d['peak_gb']:.1f} | {k['peak_gb']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
