"""DEQ Equiformers against explicit Equiformers on molecular dynamics frames (``--family v2``:
DEQEquiformerV2 vs EquiformerV2; ``--family v1``: DEQEquiformerV1 vs EquiformerV1).

Compared: the DEQ (the fixed point of ``--blocks`` transformer blocks), the explicit model of the
same width and depth (the same blocks applied once), and the explicit model with as many layers
as the DEQ's mean solver iterations in training. (V1's DEQ decodes with one more block, V1's own
last block, so its explicit counterparts have one more block too: ``--blocks`` + 1 and
iterations + 1.) All are trained the same way on frames of a
GFN2-xTB trajectory (``fairchem_equiformers.data.molecules.md_frames``), forces = -dE/dpos.

Reported per model: parameters, force MAE on held-out frames after a short training, the
training step's activation memory (bytes autograd saves for the backward pass, and peak CUDA
memory on a GPU), the training step time, and the inference time per frame on consecutive
frames (one structure per call, as in MD); for the DEQ also with fixed-point reuse.

``--gradients ift phantom unrolled phantom:4`` also trains the DEQ with each training gradient
(``phantom:k``: ``k`` phantom steps) and reports its held-out force MAE in training mode (the
forces the force loss fits) and at inference (the energy's exact gradient), and its training time.

    python benchmarks/bench_deq.py [--family v2|v1] [--molecule ethanol] [--frames 240] [--steps 300]
        [--gradients ift phantom ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs

from fairchem_equiformers import DEQEquiformerV1, DEQEquiformerV2, EquiformerV1, EquiformerV2
from fairchem_equiformers.data.molecules import md_frames
from fairchem_equiformers.deq.model import DEQBackbone

WIDTH_V2 = dict(
    use_pbc=False, direct_forces=False, max_radius=5.0, max_neighbors=100, sphere_channels=32,
    attn_hidden_channels=32, num_heads=4, attn_alpha_channels=16, attn_value_channels=8,
    ffn_hidden_channels=64, norm_type="layer_norm_sh", lmax_list=[2], mmax_list=[2], grid_resolution=10,
    edge_channels=32, num_distance_basis=64, use_grid_mlp=True, avg_num_nodes=9.0, avg_degree=8.0,
)  # fmt: skip
WIDTH_V1 = dict(
    use_pbc=False, direct_forces=False, max_radius=5.0, irreps_node_embedding="32x0e+16x1e+8x2e",
    irreps_head="16x0e+8x1e+4x2e", num_heads=2, irreps_mlp_mid="96x0e+48x1e+24x2e",
    irreps_feature="128x0e", avg_num_nodes=9.0, avg_degree=8.0,
)  # fmt: skip
FAMILIES = {  # family: (DEQ class, explicit class, explicit width kwargs, extra explicit blocks)
    "v2": (DEQEquiformerV2, EquiformerV2, WIDTH_V2, dict(alpha_drop=0.0, drop_path_rate=0.0), 0),
    "v1": (DEQEquiformerV1, EquiformerV1, WIDTH_V1, {}, 1),
}


def graphs(frames, device):
    converter = AtomsToGraphs(r_edges=False, r_pbc=False, r_energy=True, r_forces=True)
    data = []
    for i, atoms in enumerate(frames):
        d = converter.convert(atoms)
        d.sid = i
        data.append(d)
    return [d.to(device) for d in data]


def batch_of(data):
    return data_list_collater(data)


class SavedTensorBytes:
    """Bytes of the distinct tensors autograd saves for the backward pass (activation memory)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def train(model, train_data, steps, energy_mean, energy_std, force_std, seed=0):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(seed)
    model.train()
    step_times, iterations = [], []
    for _ in range(steps):
        batch = batch_of([train_data[i] for i in rng.choice(len(train_data), 4, replace=False)])
        start = time.perf_counter()
        out = model(batch)
        energy_loss = (out["energy"] - (batch.energy - energy_mean) / energy_std).abs().mean()
        force_loss = (out["forces"] - batch.forces / force_std).norm(dim=1).mean()
        optimizer.zero_grad()
        (energy_loss + 50 * force_loss).backward()
        optimizer.step()
        schedule.step()
        step_times.append(time.perf_counter() - start)
        if isinstance(model, DEQBackbone):
            iterations.append(model.deq_stats["iterations"])
    return float(np.median(step_times)), float(np.mean(iterations)) if iterations else None


def activation_memory(model, data, device) -> tuple[int, int | None]:
    model.train()
    batch = batch_of(data[:4])
    counter = SavedTensorBytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        out = model(batch)
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    model.zero_grad()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return counter.total, peak


def force_mae(model, test_data, force_std, training_mode: bool) -> float:
    """Held-out force MAE (eV/A) in training mode (with the training gradient) or at inference."""
    model.train(training_mode)
    errors = [
        (model(batch_of([data]))["forces"].detach() * force_std - data.forces).abs().mean().item()
        for data in test_data
    ]
    return float(np.mean(errors))


def evaluate(model, test_data, energy_mean, energy_std, force_std, reuse=False):
    """Force MAE (eV/A) and seconds per frame, one frame per call in trajectory order."""
    model.eval()
    if isinstance(model, DEQBackbone):
        model.reuse_fixed_point = reuse
        model.reset_fixed_point()
    errors, times, iterations = [], [], []
    for data in test_data:
        batch = batch_of([data])
        start = time.perf_counter()
        out = model(batch)
        times.append(time.perf_counter() - start)
        errors.append((out["forces"].detach() * force_std - batch.forces).abs().mean().item())
        if isinstance(model, DEQBackbone):
            iterations.append(model.deq_stats["iterations"])
    return (
        float(np.mean(errors)),
        float(np.mean(times[1:])),
        float(np.mean(iterations)) if iterations else None,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="v2")
    parser.add_argument("--molecule", default="ethanol")
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--test-frames", type=int, default=40, help="the last frames, in order")
    parser.add_argument("--steps", type=int, default=300, help="training steps (batch 4)")
    parser.add_argument("--blocks", type=int, default=1, help="transformer blocks inside the DEQ map")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gradients", nargs="*", default=[], help="DEQ training gradients: ift, phantom[:k], unrolled"
    )
    args = parser.parse_args(argv)
    choices = {"ift", "phantom", "unrolled"} | {f"phantom:{k}" for k in range(1, 65)}
    for gradient in args.gradients:
        if gradient not in choices:
            parser.error(f"--gradients {gradient}: choose ift, phantom, phantom:<steps> or unrolled")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    start = time.perf_counter()
    frames = md_frames(args.molecule, args.frames, seed=args.seed)
    print(
        f"{len(frames)} frames of {args.molecule} ({len(frames[0])} atoms), "
        f"{time.perf_counter() - start:.0f} s of GFN2-xTB"
    )
    data = graphs(frames, device)
    train_data, test_data = data[: -args.test_frames], data[-args.test_frames :]
    energies = np.array([float(d.energy) for d in train_data])
    energy_mean, energy_std = float(energies.mean()), float(energies.std())
    force_std = float(torch.cat([d.forces for d in train_data]).std())
    print(
        f"mean predictor force MAE: {float(torch.cat([d.forces for d in test_data]).abs().mean()):.3f} eV/A"
    )

    rows = []

    def run(name, model):
        torch.manual_seed(args.seed)
        step_time, train_iterations = train(model, train_data, args.steps, energy_mean, energy_std, force_std)
        saved, peak = activation_memory(model, train_data, device)
        mae, infer, iterations = evaluate(model, test_data, energy_mean, energy_std, force_std)
        row = dict(name=name, params=sum(p.numel() for p in model.parameters()), mae=mae, saved=saved,
                   peak=peak, step=step_time, infer=infer, iterations=iterations)  # fmt: skip
        if isinstance(model, DEQBackbone):
            _, row["infer_reuse"], row["iterations_reuse"] = evaluate(
                model, test_data, energy_mean, energy_std, force_std, reuse=True
            )
        rows.append(row)
        print(row, flush=True)
        return train_iterations

    deq_class, explicit_class, width, explicit_extra, decoder_blocks = FAMILIES[args.family]
    torch.manual_seed(args.seed)
    deq = deq_class(num_layers=args.blocks, **width).to(device)
    train_iterations = run(f"DEQ ({args.blocks} block{'s' * (args.blocks > 1)})", deq)
    for depth in (args.blocks, max(1, round(train_iterations))):
        layers = depth + decoder_blocks
        torch.manual_seed(args.seed)
        model = explicit_class(num_layers=layers, **explicit_extra, **width).to(device)
        run(f"explicit, {layers} layer{'s' * (layers > 1)}", model)

    print(f"\n{args.family}: {args.molecule}, {len(train_data)} training frames, {args.steps} steps of 4, "
          f"device {device}; DEQ mean solver iterations in training {train_iterations:.1f}")  # fmt: skip
    print("| model | params | force MAE (eV/A) | train activations (MB) | train step (s) | "
          "inference (ms/frame) | with reuse (ms/frame) | solver iterations (reuse) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        reuse = f"{1000 * r['infer_reuse']:.0f}" if "infer_reuse" in r else "-"
        its = f"{r['iterations']:.1f} ({r['iterations_reuse']:.1f})" if r["iterations"] is not None else "-"
        memory = f"{r['saved'] / 2**20:.1f}" + (f" (peak {r['peak'] / 2**20:.0f})" if r["peak"] else "")
        print(f"| {r['name']} | {r['params']:,} | {r['mae']:.3f} | {memory} | {r['step']:.3f} | "
              f"{1000 * r['infer']:.0f} | {reuse} | {its} |")  # fmt: skip

    if not args.gradients:
        return
    table = ["| DEQ training gradient | force MAE in training mode (eV/A) | at inference | training (s) |"]
    table.append("|---|---:|---:|---:|")
    for gradient in args.gradients:
        name, *steps = gradient.split(":")
        keys = {"gradient": name} | ({"phantom_steps": int(steps[0])} if steps else {})
        torch.manual_seed(args.seed)
        model = deq_class(num_layers=args.blocks, **width, **keys).to(device)
        start = time.perf_counter()
        train(model, train_data, args.steps, energy_mean, energy_std, force_std)
        seconds = time.perf_counter() - start
        in_training = force_mae(model, test_data, force_std, training_mode=True)
        at_inference = force_mae(model, test_data, force_std, training_mode=False)
        table.append(f"| {gradient} | {in_training:.3f} | {at_inference:.3f} | {seconds:.0f} |")
        print(table[-1], flush=True)
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
