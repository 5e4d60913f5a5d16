"""EquiformerV2: the plugin against fairchem 1.10's implementation on the same weights.

Measures, on a batch of ~80-atom OC20-like slabs: inference (no grad), a training step
(forward, energy + force loss, backward), and the peak memory of each, then prints the ratios.
Also the achieved GFLOP/s of the useful work (the plugin's matmul FLOPs per step, counted by
torch's FlopCounterMode) against the machine's matmul peak, measured in the same run. Every
(implementation, mode) runs in a fresh subprocess so that its peak resident memory is its
own (CPU allocations are invisible to torch's memory statistics).

    python benchmarks/bench_equiformer_v2.py --model 31M --structures 2 --repeats 3 --rounds 3

``--rounds`` alternates the implementations in fresh processes and keeps each one's best time (a
shared machine drifts by tens of percent within minutes); the speed-up of every round is printed.

``--forces conservative`` times the plugin's direct-force model against its conservative one
(``direct_forces=False``: forces = -dE/dpos, one backward pass more in inference, a double
backward in training) instead of the reference; ``--forces both`` prints both tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

PRESETS = {
    "tiny": dict(num_layers=2, lmax_list=[2], mmax_list=[1], sphere_channels=32, attn_hidden_channels=16,
                 attn_alpha_channels=16, ffn_hidden_channels=32, edge_channels=32),
    "31M": dict(num_layers=8, lmax_list=[4], mmax_list=[2]),
    "83M": dict(num_layers=12, lmax_list=[6], mmax_list=[2]),
}  # fmt: skip
RELEASED = dict(
    use_pbc=True, otf_graph=True, max_neighbors=20, max_radius=12.0, max_num_elements=90,
    sphere_channels=128, attn_hidden_channels=64, num_heads=8, attn_alpha_channels=64,
    attn_value_channels=16, ffn_hidden_channels=128, norm_type="layer_norm_sh", grid_resolution=18,
    edge_channels=128, use_grid_mlp=True, use_sep_s2_act=True, use_attn_renorm=True,
    alpha_drop=0.0, drop_path_rate=0.0, proj_drop=0.0,
)  # fmt: skip


def slabs(count: int):
    import numpy as np
    from ase.build import add_adsorbate, fcc111, molecule

    out = []
    metals = ["Cu", "Pt", "Ag", "Pd", "Ni", "Au"]
    for i in range(count):
        slab = fcc111(metals[i % len(metals)], size=(4, 4, 5), vacuum=8.0)
        add_adsorbate(slab, molecule("CO"), height=1.9, position="fcc")
        slab.rattle(0.05, seed=i)
        slab.pbc = True
        slab.set_tags(np.ones(len(slab), dtype=int))
        out.append(slab)
    return out


def run_step(model, batch, mode: str) -> None:
    """One inference pass (no grad) or one training step (forward, energy + force loss,
    backward): the unit every EquiformerV2 benchmark times."""
    import torch

    if mode == "inference":
        model.eval()
        with torch.no_grad():  # conservative forces re-enable gradients inside forward
            model(batch)
    else:
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(batch)
        (out["energy"].abs().mean() + 100 * out["forces"].norm(dim=-1).mean()).backward()


def worker(args) -> dict:
    import torch
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as Reference
    from fairchem.core.preprocessing import AtomsToGraphs

    from fairchem_equiformers import EquiformerV2

    torch.set_num_threads(args.threads)
    config = {**RELEASED, **PRESETS[args.model]}
    torch.manual_seed(0)
    reference = Reference(**config)
    precision = args.reference_precision if args.impl == "reference" else args.precision
    # ours in bf16: the model's own key (its blocks under bf16 autocast, float32 geometry and sums)
    own = {"precision": "bf16"} if precision == "bf16" and args.impl != "reference" else {}
    if args.impl == "conservative":
        model = EquiformerV2(**config, **own, direct_forces=False)
        model.load_state_dict(reference.state_dict())  # the force head is skipped
        del reference
    elif args.impl == "ours":
        model = EquiformerV2(**config, **own)
        model.load_state_dict(reference.state_dict())
        del reference
    else:
        model = reference
    converter = AtomsToGraphs(r_edges=False, r_pbc=True)
    batch = data_list_collater([converter.convert(a) for a in slabs(args.structures)])
    natoms = int(batch.natoms.sum())
    device = torch.device(args.device)
    model, batch = model.to(device), batch.to(device)
    cuda = device.type == "cuda"
    dtype = None if own else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    parts = args.float32_parts if args.impl != "reference" else []
    if parts:  # bench_precision's ablation: these parts of our bf16 model in float32
        from bench_precision import float32_parts

    def step():
        with (
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
            float32_parts(model, parts) if parts else contextlib.nullcontext(),
        ):
            run_step(model, batch, args.mode)
        if cuda:
            torch.cuda.synchronize()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else (peak - rss_before) / 1024
    flops = None
    if args.impl != "reference":  # the plugin's matmul FLOPs are the useful work
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    return {
        "flops": flops,
        "seconds": min(times),
        "atoms_per_second": natoms / min(times),
        "peak_mib": peak_mib,
        "natoms": natoms,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def matmul_peak(threads: int, device: str = "cpu", precision: str = "fp32") -> float:
    """GFLOP/s of a 3072 x 3072 GEMM in ``precision``: the machine's practical matmul peak."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(3072, 3072, device=device, dtype=dtype)
    b = torch.randn(3072, 3072, device=device, dtype=dtype)
    a @ b
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    synchronize()
    return 5 * 2 * 3072**3 / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="31M")
    parser.add_argument("--structures", type=int, default=2, help="~82-atom slabs per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="alternate the implementations this many times (fresh processes) and keep each one's best",
    )  # fmt: skip
    parser.add_argument(
        "--forces",
        choices=["direct", "conservative", "both"],
        default="direct",
        help="direct: ours vs fairchem's reference; conservative: our direct vs conservative forces",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
        help="bf16: the plugin's model with precision: bf16, the reference under bf16 autocast; "
        "fp16: float16 autocast around both",
    )  # fmt: skip
    parser.add_argument(
        "--reference-precision", choices=["fp32", "bf16", "fp16"],
        help="the reference's own precision (default: --precision), e.g. fp32 against ours in bf16",
    )  # fmt: skip
    parser.add_argument(
        "--float32-parts", nargs="+", default=[],
        help="with --precision bf16: these parts of ours in float32 (bench_precision.py --ablation's "
        "names, e.g. RadialMLP EdgeRotation)",
    )  # fmt: skip
    parser.add_argument("--json", help="append the results (one line per mode) to this file")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.reference_precision = args.reference_precision or args.precision
    if args.worker == ["peak", "matmul"]:
        print(json.dumps({"gflops": matmul_peak(args.threads, args.device, args.precision)}))
        return
    if args.worker:
        args.impl, args.mode = args.worker
        print(json.dumps(worker(args)))
        return

    comparisons = {"direct": [("reference", "ours")], "conservative": [("ours", "conservative")]}
    comparisons["both"] = comparisons["direct"] + comparisons["conservative"]
    peak = run_worker(args, "peak", "matmul")["gflops"]
    for baseline, candidate in comparisons[args.forces]:
        compare(args, baseline, candidate, peak)


def run_worker(args, impl: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, mode, "--model", args.model,
           "--structures", str(args.structures), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--device", args.device, "--precision", args.precision,
           "--reference-precision", args.reference_precision,
           *(["--float32-parts", *args.float32_parts] if args.float32_parts else [])]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(args, baseline: str, candidate: str, peak_gflops: float) -> None:
    """Print s/step, atoms/s and peak memory of ``candidate`` against ``baseline``, and the
    rate of useful work (the candidate's matmul FLOPs per step) against the matmul peak."""
    runs = {(impl, mode): [] for mode in ("inference", "train") for impl in (baseline, candidate)}
    for _ in range(args.rounds):  # alternate the two, so that a drift of the machine hits both
        for impl, mode in runs:
            runs[(impl, mode)].append(run_worker(args, impl, mode))
    results = {key: min(rs, key=lambda r: r["seconds"]) for key, rs in runs.items()}
    first = results[(candidate, "inference")]
    reference = args.reference_precision
    print(f"EquiformerV2 {args.model} ({first['num_params']:,} params), batch of {args.structures} slabs "
          f"= {first['natoms']} atoms, {args.device} ({args.threads} threads), {args.precision}"
          f"{f' (reference {reference})' if reference != args.precision else ''}")  # fmt: skip
    print(f"useful work: the {candidate} model's matmul FLOPs per step (FlopCounterMode); machine matmul "
          f"peak {peak_gflops:.0f} GFLOP/s (3072^2 {args.precision} GEMM, same threads)")  # fmt: skip
    print(f"{'mode':<10} {'impl':<13} {'s/step':>8} {'atoms/s':>9} {'peak MiB':>9} "
          f"{'GFLOP/s':>8} {'of peak':>8}")  # fmt: skip
    for mode in ("inference", "train"):
        useful = results[(candidate, mode)]["flops"]
        for impl in (baseline, candidate):
            r = results[(impl, mode)]
            rate = useful / r["seconds"] / 1e9
            print(
                f"{mode:<10} {impl:<13} {r['seconds']:8.3f} {r['atoms_per_second']:9.1f} {r['peak_mib']:9.0f}"
                f" {rate:8.1f} {rate / peak_gflops:8.0%}"
            )
        base, cand = results[(baseline, mode)], results[(candidate, mode)]
        if args.json:
            with open(args.json, "a") as file:
                file.write(json.dumps({
                    "benchmark": "EquiformerV2", "model": args.model, "device": args.device,
                    "precision": args.precision, "reference precision": reference, "mode": mode,
                    baseline: base["seconds"], candidate: cand["seconds"],
                    "speed-up": base["seconds"] / cand["seconds"],
                    "memory ratio": cand["peak_mib"] / max(base["peak_mib"], 1e-9),
                }) + "\n")  # fmt: skip
        print(f"{mode:<10} {'ratio':<13} {candidate} takes x{cand['seconds'] / base['seconds']:.2f} the time "
              f"of {baseline}, memory x{cand['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}")  # fmt: skip
        if args.rounds > 1:
            speedups = [
                b["seconds"] / c["seconds"] for b, c in zip(runs[(baseline, mode)], runs[(candidate, mode)])
            ]
            print(f"{mode:<10} {'per round':<13} speed-up " + ", ".join(f"x{v:.2f}" for v in speedups))


if __name__ == "__main__":
    main()
