"""EquiformerV3: the plugin against the official implementation on the same weights.

The official model is ``equiformer-v3==0.0.3`` (installed by ``scripts/test.sh`` with ``--no-deps``;
``pip install --no-deps equiformer-v3==0.0.3`` otherwise). Measures inference (no grad) and a
training step (forward, energy + force (+ stress) loss, backward) and the peak memory of each,
then prints the ratios, for the model sections of two released configs:

* ``2M-base``: OC20 S2EF-2M base (8 layers, L6/M2, 128 channels; 12 A, 20 neighbours), on
  batches of ~82-atom OC20-like slabs with a CO adsorbate;
* ``omat-L4``: the OMat24 L4 direct model (7 layers, L4/M2; 6 A, up to 300 neighbours; direct
  stress), on rattled bulk cells of 54-128 atoms (Cu 108, NaCl 64, Si 64, Fe 54, in turn).

Dropouts are off so that both compute the same function; before timing, the outputs of the two
on the benchmark batch are compared (both given the same edge frames: the official code draws
each frame's rotation about the edge at random) and the largest relative difference printed.
Every (implementation, mode) runs in a fresh subprocess so that its peak resident memory is its
own; ``--rounds`` alternates the implementations and keeps each one's best time. ``--compile``
adds the plugin's model under ``torch.compile`` (inductor, automatic dynamic shapes; the
compilation happens in the untimed warm-up step) and its outputs against the eager model's.

    python benchmarks/bench_equiformer_v3.py --model 2M-base --structures 2 --repeats 3 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

BASE = dict(
    use_pbc=True, otf_graph=True, regress_forces=True, direct_prediction=True, max_num_elements=128,
    num_channels=128, num_heads=8, attn_alpha_channels=64, attn_value_channels=16, ffn_hidden_channels=512,
    norm_type="merge_layer_norm", mmax=2, edge_channels=128, use_atom_edge_embedding=True, use_envelope=True,
    attn_activation="sep-merge_gates2_swiglu", ffn_activation="sep-merge_gates2_swiglu", use_grid_mlp=True,
    use_gate_force_head=True, attn_weights_drop=0.0, drop_path_rate=0.0, enforce_max_neighbors_strictly=True,
)  # fmt: skip
PRESETS = {
    "tiny": dict(num_layers=2, lmax=2, num_channels=32, attn_hidden_channels=16, attn_alpha_channels=8,
                 ffn_hidden_channels=64, edge_channels=32, max_neighbors=20, max_radius=6.0,
                 num_radial_basis=32,
                 attn_grid_resolution_list=[8, 7], ffn_grid_resolution_list=[8, 8]),
    "2M-base": dict(num_layers=8, lmax=6, attn_hidden_channels=64, max_neighbors=20, max_radius=12.0,
                    num_radial_basis=128, attn_grid_resolution_list=[20, 8],
                    ffn_grid_resolution_list=[20, 20]),
    "omat-L4": dict(num_layers=7, lmax=4, attn_hidden_channels=32, max_neighbors=300, max_radius=6.0,
                    num_radial_basis=64, attn_grid_resolution_list=[14, 8], ffn_grid_resolution_list=[14, 14],
                    regress_stress=True, use_pbc_single=True, avg_num_nodes=1),
}  # fmt: skip


def structures(model: str, count: int):
    import numpy as np
    from ase.build import add_adsorbate, bulk, fcc111, molecule

    out = []
    for i in range(count):
        if model == "omat-L4":
            cells = [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("NaCl", "rocksalt", a=5.64),
                     bulk("Si", "diamond", a=5.43, cubic=True),
                     bulk("Fe", "bcc", a=2.87, cubic=True)]  # fmt: skip
            atoms = cells[i % 4]
            atoms = atoms.repeat([max(1, round((64 / len(atoms)) ** (1 / 3)))] * 3)
        else:
            atoms = fcc111(["Cu", "Pt", "Ag", "Pd", "Ni", "Au"][i % 6], size=(4, 4, 5), vacuum=8.0)
            add_adsorbate(atoms, molecule("CO"), height=1.9, position="fcc")
            atoms.set_tags(np.ones(len(atoms), dtype=int))
        atoms.rattle(0.05, seed=i)
        atoms.pbc = True
        out.append(atoms)
    return out


@contextlib.contextmanager
def fixed_frame_vectors():
    """The official frame's random helper vector as a fixed function of the edge vector."""
    import torch

    original = torch.rand_like

    def helper(t, *args, **kwargs):
        v = t.detach()
        return 0.5 * torch.stack(
            [torch.sin(13.1 * v[:, 1] + 1.3), torch.cos(7.7 * v[:, 2] + 0.2), torch.sin(5.3 * v[:, 0] + 2.1)],
            1,
        )

    torch.rand_like = helper
    try:
        yield
    finally:
        torch.rand_like = original


def build(args, impl: str):
    """The official model (seeded weights), or the plugin's with the official state dict."""
    import equiformer_v3  # noqa: F401  (registers "equiformer_v3")
    import torch
    from fairchem.core.common.registry import registry

    from fairchem_equiformers import EquiformerV3

    config = {**BASE, **PRESETS[args.model]}
    torch.manual_seed(0)
    official = registry.get_model_class("equiformer_v3")(**config)
    if impl == "official":
        return official
    ours = EquiformerV3(**config)
    ours.load_state_dict(official.state_dict(), strict=True)
    if impl == "compiled":
        ours.compile()
    return ours


def batch_of(args):
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    converter = AtomsToGraphs(r_edges=False, r_pbc=True)
    return data_list_collater([converter.convert(a) for a in structures(args.model, args.structures)])


def run_step(model, batch, mode: str) -> None:
    import torch

    if mode == "inference":
        model.eval()
        with torch.no_grad():
            model(batch)
    else:
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(batch)
        loss = out["energy"].abs().mean() + 100 * out["forces"].norm(dim=-1).mean()
        if "stress" in out:
            loss = loss + out["stress"].abs().mean()
        loss.backward()


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args, args.impl)
    batch = batch_of(args)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_step(model, batch, args.mode)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_step(model, batch, args.mode)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    natoms = int(batch.natoms.sum())
    return {
        "seconds": min(times),
        "atoms_per_second": natoms / min(times),
        "peak_mib": (peak - rss_before) / 1024,
        "natoms": natoms,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def parity(args) -> dict:
    """Largest relative difference of each output, the plugin against the official model."""
    import torch
    from equiformer_v3.experimental.models.equiformer_v3 import edge_rot_mat

    from fairchem_equiformers.primitives import EdgeRotation

    torch.set_num_threads(args.threads)
    official, ours = build(args, "official"), build(args, "ours")
    ours._edge_rotation = lambda vec: EdgeRotation.from_rotation_matrices(
        edge_rot_mat.init_edge_rot_mat(vec), ours.layout
    )
    official.eval()
    ours.eval()
    with fixed_frame_vectors(), torch.no_grad():
        expected, actual = official(batch_of(args)), ours(batch_of(args))
    errors = {k: float((actual[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected}
    if args.compile:  # the compiled model against the eager one (the package's own frames)
        eager = build(args, "ours").eval()
        compiled = build(args, "compiled").eval()
        with torch.no_grad():
            expected, actual = eager(batch_of(args)), compiled(batch_of(args))
        errors |= {
            f"compiled {k}": float((actual[k] - expected[k]).abs().max() / expected[k].abs().max())
            for k in expected
        }
    return errors


def run_worker(args, impl: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, mode, "--model", args.model,
           "--structures", str(args.structures), "--repeats", str(args.repeats),
           "--threads", str(args.threads)] + (["--compile"] if args.compile else [])  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="2M-base")
    parser.add_argument("--structures", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate the implementations, keep each one's best"
    )
    parser.add_argument("--compile", action="store_true", help="also the plugin under torch.compile")
    parser.add_argument("--modes", nargs="+", choices=("inference", "train"), default=["inference", "train"])
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl, args.mode = args.worker
        print(json.dumps(parity(args) if args.mode == "parity" else worker(args)))
        return

    errors = run_worker(args, "both", "parity")
    impls = ("official", "ours", "compiled") if args.compile else ("official", "ours")
    runs = {(impl, mode): [] for mode in args.modes for impl in impls}
    for _ in range(args.rounds):
        for impl, mode in runs:
            runs[(impl, mode)].append(run_worker(args, impl, mode))
    best = {key: min(rs, key=lambda r: r["seconds"]) for key, rs in runs.items()}
    first = best[("ours", args.modes[0])]
    print(f"EquiformerV3 {args.model} ({first['num_params']:,} params), "
          f"batch of {args.structures} structures "
          f"= {first['natoms']} atoms, {args.threads} threads, float32")  # fmt: skip
    print("outputs, plugin vs official (compiled: vs the eager plugin) (max |diff| / max |reference|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))  # fmt: skip
    print(f"{'mode':<10} {'impl':<9} {'s/step':>8} {'atoms/s':>9} {'peak MiB':>9}")
    for mode in args.modes:
        for impl in impls:
            r = best[(impl, mode)]
            print(
                f"{mode:<10} {impl:<9} {r['seconds']:8.3f} {r['atoms_per_second']:9.1f} {r['peak_mib']:9.0f}"
            )
        base, cand = best[("official", mode)], best[("ours", mode)]
        print(f"{mode:<10} {'ratio':<9} speed-up x{base['seconds'] / cand['seconds']:.2f}, "
              f"memory x{cand['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}")  # fmt: skip
        if args.compile:
            compiled = best[("compiled", mode)]
            print(f"{mode:<10} {'compiled':<9} speed-up x{base['seconds'] / compiled['seconds']:.2f} "
                  f"(x{cand['seconds'] / compiled['seconds']:.2f} the eager plugin)")  # fmt: skip
        if args.rounds > 1:
            ups = [
                b["seconds"] / c["seconds"] for b, c in zip(runs[("official", mode)], runs[("ours", mode)])
            ]
            print(f"{mode:<10} {'per round':<9} speed-up " + ", ".join(f"x{v:.2f}" for v in ups))


if __name__ == "__main__":
    main()
