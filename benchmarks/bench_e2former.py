"""Time and memory per atom of E2Former against the plugin's EquiformerV2 of similar width, as the
number of neighbours grows (16..128) and as the number of atoms grows: E2Former's claim is that
its tensor products are per node (O(|V|)) while EquiformerV2's SO(2) convolutions are per edge
(O(|E|)).

Structures: random non-periodic clusters at liquid-like density (one atom per 11 A^3, Cu), with a
cutoff large enough that every atom has ``max_neighbors`` neighbours, so E = N k exactly.
Both models: 2 layers, lmax 2, the same channel count; EquiformerV2 with mmax 2 (no truncation,
the same angular content). Timed: a training step (forward with forces + backward) and, separately,
inference; memory: peak CUDA memory of the training step on a GPU, otherwise the bytes autograd
saves for backward in the training step (a device-independent proxy for activation memory).

    python benchmarks/bench_e2former.py                    # CPU defaults: 64 channels
    python benchmarks/bench_e2former.py --device cuda --channels 128 --atoms 100 200 400 800 1600
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from fairchem_equiformers import E2Former, EquiformerV2

DENSITY = 1 / 11.0  # atoms per A^3


def cluster(num_atoms: int, seed: int, device: str) -> Batch:
    rng = np.random.default_rng(seed)
    side = (num_atoms / DENSITY) ** (1 / 3)
    grid = int(np.ceil(num_atoms ** (1 / 3)))
    sites = np.stack(np.meshgrid(*[np.arange(grid)] * 3, indexing="ij"), -1).reshape(-1, 3)[:num_atoms]
    pos = (sites + 0.15 * rng.normal(size=sites.shape)) * side / grid
    data = Data(
        pos=torch.tensor(pos, dtype=torch.float32),
        atomic_numbers=torch.full((num_atoms,), 29),
        natoms=torch.tensor([num_atoms]),
        cell=torch.eye(3)[None] * 1000.0,
        fixed=torch.zeros(num_atoms),
    )
    return Batch.from_data_list([data]).to(device)


def models(channels: int, neighbours: int, radius: float, direct: bool):
    common = dict(use_pbc=False, max_neighbors=neighbours, max_radius=radius, num_layers=2)
    e2former = E2Former(
        **common, irreps_node_embedding=f"{channels}x0e+{channels}x1e+{channels}x2e", num_heads=8,
        attn_alpha_channels=channels // 8, ffn_hidden_channels=channels, num_distance_basis=128,
        edge_channels=channels, direct_forces=direct,
    )  # fmt: skip
    eqv2 = EquiformerV2(
        **common, sphere_channels=channels, attn_hidden_channels=channels, num_heads=8,
        attn_alpha_channels=channels // 8, attn_value_channels=channels // 8, ffn_hidden_channels=channels,
        lmax_list=[2], mmax_list=[2], edge_channels=channels, num_distance_basis=128,
        norm_type="layer_norm_sh", alpha_drop=0.0, drop_path_rate=0.0, use_grid_mlp=True,
    )  # fmt: skip
    return {"E2Former" + ("" if direct else " (-dE/dx)"): e2former, "EquiformerV2": eqv2}


def saved_bytes(step) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def measure(model, batch, device: str, repeats: int) -> tuple[float, float, float]:
    """(train step s, inference s, memory bytes)."""

    def train_step():
        model.train()
        out = model(batch.clone())
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()

    def inference():
        model.eval()
        with (
            torch.no_grad()
            if not isinstance(model, E2Former) or model.direct_forces
            else contextlib.nullcontext()
        ):
            model(batch.clone())

    def timed(fn):
        fn()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    train = timed(train_step)
    infer = timed(inference)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step()
        memory = torch.cuda.max_memory_allocated() - base
    else:
        memory = saved_bytes(train_step)
    return train, infer, memory


def crossover(xs, ratios) -> str:
    for (x0, r0), (x1, r1) in zip(zip(xs, ratios), zip(xs[1:], ratios[1:])):
        if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
            return f"~{x0 + (1 - r0) * (x1 - x0) / (r1 - r0):.0f}"
    return (
        "none in range ("
        + ("E2Former always faster" if ratios[0] < 1 else "EquiformerV2 always faster")
        + ")"
    )


def sweep(label, points, make_batch, make_models, device, repeats):
    print(f"\n{label}")
    print(f"{'':>8} {'model':>20} {'train ms/atom':>14} {'infer ms/atom':>14} {'memory kB/atom':>15}")
    ratios = {"train": [], "infer": [], "memory": []}
    for point in points:
        batch, num_atoms = make_batch(point)
        results = {}
        for name, model in make_models(point).items():
            torch.manual_seed(0)
            model = model.to(device)
            train, infer, memory = measure(model, batch, device, repeats)
            results[name] = (train, infer, memory)
            print(
                f"{point:>8} {name:>20} {1e3 * train / num_atoms:>14.3f} {1e3 * infer / num_atoms:>14.3f}"
                f" {memory / 1024 / num_atoms:>15.1f}"
            )
        e2f = next(v for k, v in results.items() if k.startswith("E2Former"))
        for i, key in enumerate(ratios):
            ratios[key].append(e2f[i] / results["EquiformerV2"][i])
    for key, values in ratios.items():
        print(f"  E2Former / EquiformerV2 {key}: " + ", ".join(f"{r:.2f}" for r in values)
              + f"; crossover at {crossover(list(points), values)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--atoms", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--atoms-for-neighbour-sweep", type=int, default=200)
    parser.add_argument("--neighbours-for-atom-sweep", type=int, default=32)
    parser.add_argument("--conservative", action="store_true", help="E2Former with -dE/dx forces")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    direct = not args.conservative
    radius = 30.0  # larger than any neighbour shell asked for: max_neighbors decides
    print(f"device {args.device}, {args.channels} channels, lmax 2, 2 layers")

    def by_neighbours(k):
        return cluster(args.atoms_for_neighbour_sweep, 0, args.device), args.atoms_for_neighbour_sweep

    sweep(
        f"neighbours per atom (N = {args.atoms_for_neighbour_sweep})", args.neighbours, by_neighbours,
        lambda k: models(args.channels, k, radius, direct), args.device, args.repeats,
    )  # fmt: skip
    sweep(
        f"atoms (k = {args.neighbours_for_atom_sweep} neighbours)", args.atoms,
        lambda n: (cluster(n, 0, args.device), n),
        lambda n: models(args.channels, args.neighbours_for_atom_sweep, radius, direct),
        args.device, args.repeats,
    )  # fmt: skip


if __name__ == "__main__":
    main()
