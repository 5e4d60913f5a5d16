"""Neighbour search against the number of atoms: the plugin's linear-time search
(``primitives.radius_graph``, vesin's cell lists with fairchem's rules) against fairchem 1.10's
``radius_graph_pbc`` (all pairs times all images in range) on rattled fcc Cu supercells of 32
to 10,976 atoms (6 A cutoff, ``max_neighbors`` 50 non-strict), checking on every size where
both run that the edges are the same; then a small EquiformerV2 (one layer, lmax 2, 32
channels, on-the-fly periodic graph) per atom and per edge, with the search's share, and the
search without periodic boundaries (the same atoms as a cluster).

    python benchmarks/bench_neighbors.py                 # --threads 1 --reference-max-atoms 2048

The model is timed after one warm-up call at each size; ``--keep-freed`` calls
``fairchem_equiformers.keep_freed_memory()`` first (``bench_allocator.py``).
"""

from __future__ import annotations

import argparse
import time

import torch
from ase.build import bulk
from fairchem.core.common.utils import radius_graph_pbc
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs

from fairchem_equiformers import EquiformerV2, keep_freed_memory
from fairchem_equiformers.primitives import radius_graph

REPEATS = [2, 3, 4, 5, 6, 8, 10, 14]  # 4 n^3 atoms: 32 .. 10,976
RADIUS, MAX_NEIGHBORS = 6.0, 50
SMALL_V2 = dict(
    use_pbc=True, otf_graph=True, max_neighbors=MAX_NEIGHBORS, max_radius=RADIUS, num_layers=1,
    sphere_channels=32, attn_hidden_channels=32, num_heads=2, attn_alpha_channels=16,
    attn_value_channels=8, ffn_hidden_channels=32, lmax_list=[2], mmax_list=[2], edge_channels=32,
    enforce_max_neighbors_strictly=False, direct_forces=False,
)  # fmt: skip


def supercell(n: int):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((n, n, n))
    atoms.rattle(0.05, seed=n)
    return data_list_collater([AtomsToGraphs(r_edges=False, r_pbc=True).convert(atoms)])


def best_of(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--reference-max-atoms", type=int, default=2048, help="fairchem's search above: memory"
    )
    parser.add_argument("--model-max-atoms", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-freed", action="store_true", help="glibc keeps freed memory")
    args = parser.parse_args()
    if args.keep_freed:
        assert keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = EquiformerV2(**SMALL_V2).eval()
    pbc = torch.ones(1, 3, dtype=torch.bool)
    rows = []
    for n in REPEATS:
        batch = supercell(n)
        atoms = int(batch.natoms.sum())

        def ours(batch=batch, pbc=pbc):
            return radius_graph(batch.pos, batch.natoms, batch.cell, pbc, RADIUS, MAX_NEIGHBORS, False)

        def cluster(batch=batch):
            return radius_graph(batch.pos, batch.natoms, None, None, RADIUS, MAX_NEIGHBORS, False)

        t_ours, (edges, offsets) = best_of(ours, args.repeats)
        t_cluster, _ = best_of(cluster, args.repeats)
        row = {"atoms": atoms, "edges": edges.shape[1], "ours": t_ours, "cluster": t_cluster}
        if atoms <= args.reference_max_atoms:
            t_ref, (ref_edges, ref_offsets, _) = best_of(
                lambda batch=batch: radius_graph_pbc(batch, RADIUS, MAX_NEIGHBORS, False), args.repeats
            )
            row["reference"] = t_ref
            row["same"] = torch.equal(ref_edges, edges) and torch.equal(ref_offsets.float(), offsets)
        if atoms <= args.model_max_atoms:
            model(batch)  # warm-up at this size
            t_model, _ = best_of(lambda batch=batch: model(batch), max(1, args.repeats - 1))
            row["model"] = t_model
        rows.append(row)
        print(row, flush=True)

    print(f"\n{args.threads} thread(s); cutoff {RADIUS} A, max_neighbors {MAX_NEIGHBORS} (non-strict); "
          f"best of {args.repeats}\n")  # fmt: skip
    print(
        "| atoms | edges | search ms | us/atom | fairchem ms | fairchem / ours | same edges "
        "| cluster search ms | small V2 energy+forces s | ms/atom | us/edge | search share |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = (
            f"{1e3 * r['reference']:,.1f} | x{r['reference'] / r['ours']:,.1f} | "
            f"{'yes' if r['same'] else 'NO'}"
            if "reference" in r
            else "- | - | -"
        )
        model = (
            f"{r['model']:.2f} | {1e3 * r['model'] / r['atoms']:.2f} | {1e6 * r['model'] / r['edges']:.1f} | "
            f"{r['ours'] / r['model']:.1%}"
            if "model" in r
            else "- | - | - | -"
        )
        print(
            f"| {r['atoms']:,} | {r['edges']:,} | {1e3 * r['ours']:,.1f} | "
            f"{1e6 * r['ours'] / r['atoms']:.1f} | {ref} | {1e3 * r['cluster']:,.1f} | {model} |"
        )


if __name__ == "__main__":
    main()
