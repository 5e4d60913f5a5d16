"""How the plugin's EquiformerV2 scales: time and peak memory of inference and of a training
step against the number of atoms (one slab + CO, about 25 to 1,000 atoms) and against
``max_neighbors`` (fixed structure), with the cost per edge, which stays flat when the cost
grows linearly with the number of edges. The reference (fairchem 1.10) is timed alongside on
the structures where its grid tensors fit in memory (``--reference-max-atoms``).

    python benchmarks/bench_scaling.py --model 31M
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from bench_equiformer_v2 import PRESETS, RELEASED, run_step

SLAB_SIZES = [(2, 2, 6), (3, 3, 5), (4, 4, 6), (6, 6, 5), (8, 8, 6), (10, 10, 10)]  # 26 .. 1002 atoms
NEIGHBOURS = [5, 10, 20, 30, 40]


def structure(size: tuple[int, int, int]):
    import numpy as np
    from ase.build import add_adsorbate, fcc111, molecule

    slab = fcc111("Cu", size=size, vacuum=8.0)
    add_adsorbate(slab, molecule("CO"), height=1.9, position="fcc")
    slab.rattle(0.05, seed=0)
    slab.pbc = True
    slab.set_tags(np.ones(len(slab), dtype=int))
    return slab


def worker(args) -> dict:
    import torch
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as Reference
    from fairchem.core.preprocessing import AtomsToGraphs

    from fairchem_equiformers import EquiformerV2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = {**RELEASED, **PRESETS[args.model], "max_neighbors": args.max_neighbors}
    model = (Reference if args.impl == "reference" else EquiformerV2)(**config)
    batch = data_list_collater([AtomsToGraphs(r_edges=False, r_pbc=True).convert(structure(args.size))])

    def step():
        run_step(model, batch, args.mode)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the step's, neighbour search included
    start = time.perf_counter()
    num_edges = model.generate_graph(batch).edge_index.shape[1]
    graph_seconds = time.perf_counter() - start  # fairchem's neighbour search, inside every step
    return {"atoms": len(batch.pos), "edges": num_edges, "seconds": seconds, "graph_seconds": graph_seconds,
            "peak_mib": (peak - rss_before) / 1024}  # fmt: skip


def run(args, impl: str, mode: str, size, max_neighbors: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, mode, ",".join(map(str, size)), str(max_neighbors),
           "--model", args.model, "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(args, title: str, points: list[tuple[tuple[int, int, int], int]]) -> None:
    print(f"\n{title}")
    print(f"{'atoms':>6} {'edges':>7} {'max_nb':>6} | {'mode':<9} {'s/step':>8} {'graph s':>8} "
          f"{'us/edge':>8} {'MiB':>7} | {'ref s/step':>10} {'ref MiB':>8} {'ref/ours':>8}")  # fmt: skip
    for mode in ("inference", "train"):
        for size, max_neighbors in points:
            atoms = size[0] * size[1] * size[2] + 2
            if mode == "train" and atoms > args.train_max_atoms:
                continue
            ours = run(args, "ours", mode, size, max_neighbors)
            if "error" in ours:
                print(f"{atoms:6d} {'':>7} {max_neighbors:6d} | {mode:<9} {ours['error']}")
                continue
            per_edge = 1e6 * (ours["seconds"] - ours["graph_seconds"]) / ours["edges"]
            line = (f"{ours['atoms']:6d} {ours['edges']:7d} {max_neighbors:6d} | {mode:<9} "
                    f"{ours['seconds']:8.3f} {ours['graph_seconds']:8.3f} {per_edge:8.1f} "
                    f"{ours['peak_mib']:7.0f}")  # fmt: skip
            if atoms <= args.reference_max_atoms:
                ref = run(args, "reference", mode, size, max_neighbors)
                if "error" in ref:
                    line += f" | {ref['error']}"
                else:
                    line += (f" | {ref['seconds']:10.3f} {ref['peak_mib']:8.0f} "
                             f"{ref['seconds'] / ours['seconds']:8.2f}")  # fmt: skip
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="31M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-max-atoms", type=int, default=400, help="largest structure trained on")
    parser.add_argument(
        "--reference-max-atoms", type=int, default=100, help="largest structure for the reference"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per point (the fastest counts)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl, args.mode, size, max_neighbors = args.worker
        args.size, args.max_neighbors = tuple(int(n) for n in size.split(",")), int(max_neighbors)
        print(json.dumps(worker(args)))
        return
    print(f"EquiformerV2 {args.model}, {args.threads} threads, float32, one Cu(111) slab + CO per step")
    table(args, "against the number of atoms (max_neighbors 20)", [(size, 20) for size in SLAB_SIZES])
    table(args, "against max_neighbors (98 atoms)", [((4, 4, 6), k) for k in NEIGHBOURS])


if __name__ == "__main__":
    main()
