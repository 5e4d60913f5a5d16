"""Equiformer (V1): time and memory per atom against the plugin's EquiformerV2 at comparable width,
and the cost of non-linear messages against MLP attention alone (the paper's QM9 ablation: 12.1
vs 7.2 minutes per epoch, about 1.7x).

Models (all 6 blocks, degrees up to 2, radius 5 A, gradient forces -dE/dpos, float32):

* ``v1_mlp_nonlinear``: the paper's MD17 L2 model (``128x0e+64x1e+32x2e``, 4 heads), the default;
* ``v1_mlp_linear`` / ``v1_dot_product``: the same with linear messages / dot-product attention;
* ``v2``: EquiformerV2 with 128 channels for every degree, lmax = mmax = 2, 4 heads, attention
  and FFN hidden widths 128/384 like V1's, 32 radial Gaussians, ``direct_forces=False``.

On a batch of small organic molecules (MD17-sized, non-periodic), each (model, mode) runs in its
own subprocess so that its peak resident memory is its own: inference (energy and forces) and a
training step (energy + force loss, backward through the force graph).

    python benchmarks/bench_equiformer_v1.py --molecules 8 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODELS = {
    "v1_mlp_nonlinear": {"attention_type": "mlp_nonlinear"},
    "v1_mlp_linear": {"attention_type": "mlp_linear"},
    "v1_dot_product": {"attention_type": "dot_product"},
    "v2": dict(
        use_pbc=False, direct_forces=False, max_neighbors=1000, max_radius=5.0, num_layers=6,
        sphere_channels=128, attn_hidden_channels=128, num_heads=4, attn_alpha_channels=32,
        attn_value_channels=32, ffn_hidden_channels=384, norm_type="layer_norm_sh", lmax_list=[2],
        mmax_list=[2], edge_channels=64, num_distance_basis=32, alpha_drop=0.0, drop_path_rate=0.0,
    ),
}  # fmt: skip
MOLECULES = ["C6H6", "CH3CH2OH", "CH3COCH3", "C5H5N", "CH3CH2NH2", "C4H4NH", "CH3CONH2", "C2H6CHOH"]


def batch_of(count: int):
    import numpy as np
    from ase.build import molecule
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    converter = AtomsToGraphs(r_edges=False, r_pbc=True)
    data = []
    for i in range(count):
        atoms = molecule(MOLECULES[i % len(MOLECULES)])
        atoms.rattle(0.05, seed=i)
        atoms.cell = np.eye(3) * 30.0
        data.append(converter.convert(atoms))
    return data_list_collater(data)


def worker(args) -> dict:
    import torch

    from fairchem_equiformers import EquiformerV1, EquiformerV2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.name == "v2":
        model = EquiformerV2(**MODELS["v2"])
    else:
        model = EquiformerV1(**MODELS[args.name])
    batch = batch_of(args.molecules)
    natoms = int(batch.natoms.sum())

    def step():
        if args.mode == "inference":
            model.eval()
            with torch.no_grad():  # gradient forces re-enable gradients inside forward
                model(batch)
        else:
            model.train()
            model.zero_grad(set_to_none=True)
            out = model(batch)
            loss = out["energy"].abs().mean() + 80 * out["forces"].norm(dim=-1).mean()
            loss.backward()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "ms_per_atom": 1000 * min(times) / natoms,
        "kib_per_atom": (peak - rss_before) / natoms,
        "natoms": natoms,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def run_worker(args, name: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, mode, "--molecules", str(args.molecules),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--molecules", type=int, default=8, help="molecules per batch (~12 atoms each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.name, args.mode = args.worker
        print(json.dumps(worker(args)))
        return

    results = {
        (name, mode): run_worker(args, name, mode) for name in MODELS for mode in ("inference", "train")
    }
    natoms = next(iter(results.values()))["natoms"]
    print(f"{args.molecules} molecules, {natoms} atoms, {args.threads} threads, best of {args.repeats}")
    header = (
        f"{'model':<18} {'params':>10} {'infer ms/atom':>14} {'train ms/atom':>14} {'train KiB/atom':>15}"
    )
    print(header)
    print("-" * len(header))
    for name in MODELS:
        infer, train = results[(name, "inference")], results[(name, "train")]
        print(
            f"{name:<18} {train['num_params']:>10,} {infer['ms_per_atom']:>14.2f} "
            f"{train['ms_per_atom']:>14.2f} {train['kib_per_atom']:>15.1f}"
        )
    base = results[("v1_mlp_nonlinear", "train")]["ms_per_atom"]
    linear = results[("v1_mlp_linear", "train")]["ms_per_atom"]
    print(f"\nnon-linear messages / MLP attention alone (training step): {base / linear:.2f}x (paper: 1.68x)")
    v2 = results[("v2", "train")]["ms_per_atom"]
    print(f"EquiformerV2 / Equiformer V1 (training step): {v2 / base:.2f}x")


if __name__ == "__main__":
    main()
