"""bf16 against fp32 on trained models: the same checkpoint with ``precision: bf16`` in its model
section against the checkpoint as trained (fp32), on the real DFT test sets.

The checkpoints are ``bench_real_data.py``'s (``runs/real_data/<dataset>/<model>/train``: run it
first). Per data set and model:

* test errors against DFT of both precisions (energy MAE in meV and meV/atom, force MAE in meV/A)
  and the bf16 - fp32 differences: mean and max over the test frames, and the mean force
  difference as a share of the model's own force MAE (the issue's bar: under 1%);
* inference time over the test set (batches of 16, fp32 / bf16);
* NVE molecular dynamics through fairchem's ``OCPCalculator`` from the first frame of the first
  test file
  (Maxwell-Boltzmann velocities at ``--temperature``, seed 0, velocity Verlet at ``--timestep``):
  the total energy's drift (a linear fit, meV/atom/ps) and its largest excursion from the start
  (meV/atom), and the shortest interatomic distance seen (a broken molecule shows there).

    python benchmarks/bench_precision.py --datasets 3bpa acac si --models equiformer_v2 equiformer_v3

``--ablation`` instead asks where bf16's force differences come from: the bf16 model with parts of
it run in float32 (``--parts``: module classes of the model, every instance's ``forward``, or
``EdgeRotation``, the rotations into and out of the edge frames; ``+`` joins parts), on the first
test file, each against the fp32 model: the mean and largest force difference, its share of the
force MAE, and the inference time against fp32's.

    python benchmarks/bench_precision.py --ablation --datasets acac --models equiformer_v2

Run it alone: bf16 on the CPU's matrix units suffers more than fp32 from a competing process.

Prints a markdown table; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_real_data import DATASETS, ROOT, load_ours, metrics_of, predict_ours, read_frames

PRECISIONS = ("fp32", "bf16")
# --ablation's default parts, per family (class names absent from a model are skipped)
PARTS = [
    "RadialMLP",
    "EdgeRotation",
    "RadialMLP+EdgeRotation",
    "SO2Convolution",  # V2
    "SO2Linear",  # V3
    "SO2GraphAttention",  # V2
    "EquivariantGraphAttention",  # V3
    "FeedForward",  # V2
    "FeedForwardV3",  # V3
]
ROTATIONS = ("gather_to_edge", "to_edge", "from_edge", "from_edge_m0", "from_edge_degree")


def _to_float32(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _in_float32(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return method(self, *_to_float32(args), **{k: _to_float32(v) for k, v in kwargs.items()})

    return wrapper


@contextlib.contextmanager
def float32_parts(model: torch.nn.Module, parts: list[str]):
    """``model`` (under bf16 autocast) with ``parts`` run in float32: module class names (every
    instance's ``forward``, inputs cast to float32, autocast off) or ``EdgeRotation`` (its
    rotations)."""
    from fairchem_equiformers.primitives import EdgeRotation

    classes = {type(m).__name__: type(m) for m in model.modules()}
    patched = []
    for part in parts:
        rotation = part == "EdgeRotation"
        owner, methods = (EdgeRotation, ROTATIONS) if rotation else (classes[part], ("forward",))
        for name in methods:
            patched.append((owner, name, owner.__dict__[name]))
            setattr(owner, name, _in_float32(owner.__dict__[name]))
    try:
        yield
    finally:
        for owner, name, method in reversed(patched):
            setattr(owner, name, method)


def ablation(calcs: dict, frames: list, parts: list[str]) -> list[dict]:
    """Force differences of the bf16 model against the fp32 one with each of ``parts`` (``+``
    joins) run in float32; the first row is the whole model in bf16."""
    model = calcs["bf16"].trainer._unwrapped_model
    present = {type(m).__name__ for m in model.modules()} | {"EdgeRotation"}
    predict_ours(calcs["fp32"], frames[:16], stress=False)  # warm-up
    start = time.perf_counter()
    reference = predict_ours(calcs["fp32"], frames, stress=False)
    fp32_seconds = time.perf_counter() - start
    mae = metrics_of(frames, reference["energy"], reference["forces"])["forces_mae"]
    rows = []
    for part in ["", *parts]:
        names = [n for n in part.split("+") if n]
        if not set(names) <= present:
            continue
        with float32_parts(model, names):
            predict_ours(calcs["bf16"], frames[:16], stress=False)
            start = time.perf_counter()
            out = predict_ours(calcs["bf16"], frames, stress=False)
            seconds = time.perf_counter() - start
        df = np.abs(out["forces"] - reference["forces"]) * 1000  # meV/A
        rows.append(dict(
            part=part or "(none: all bf16)", force_diff_mean=float(df.mean()), force_diff_max=float(df.max()),
            share=float(df.mean() / mae), seconds=seconds, speedup=fp32_seconds / seconds,
        ))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def with_precision(checkpoint: Path, precision: str, out: Path) -> Path:
    """A copy of ``checkpoint`` whose config says ``model.precision: <precision>`` (what a user
    writes in the model section)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = copy.copy(state)
    state["config"] = copy.deepcopy(state["config"])
    state["config"]["model"]["precision"] = precision
    path = out / f"{precision}.pt"
    torch.save(state, path)
    return path


def nve(calc, atoms, steps: int, timestep_fs: float, temperature: float) -> dict:
    """Velocity Verlet from ``atoms`` with Maxwell-Boltzmann velocities (seed 0): total energy
    drift (meV/atom/ps, linear fit), largest |E_tot - E_tot(0)| (meV/atom), shortest distance (A)."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    totals, shortest = [], np.inf
    start = time.perf_counter()
    for _ in range(steps + 1):
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        distances = atoms.get_all_distances(mic=atoms.pbc.any())
        shortest = min(shortest, distances[np.triu_indices(len(atoms), 1)].min())
        dyn.run(1)
    seconds = (time.perf_counter() - start) / (steps + 1)
    totals = (np.array(totals) - totals[0]) * 1000 / len(atoms)  # meV/atom
    times_ps = np.arange(len(totals)) * timestep_fs / 1000
    return {
        "drift": float(np.polyfit(times_ps, totals, 1)[0]),
        "excursion": float(np.abs(totals).max()),
        "shortest": float(shortest),
        "seconds_per_step": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["3bpa", "acac", "si"])
    parser.add_argument("--models", nargs="+", default=["equiformer_v2", "equiformer_v3"])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "real_data")
    parser.add_argument("--frames", type=int, default=0, help="test frames per test file (0: all)")
    parser.add_argument("--md-steps", type=int, default=500)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablation", action="store_true", help="where the bf16 differences come from")
    parser.add_argument("--parts", nargs="+", default=PARTS, help="--ablation's parts run in float32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # the calculator logs its whole config

    rows = []
    for dataset in args.datasets:
        spec = DATASETS[dataset]
        for model in args.models:
            checkpoint = args.work_dir / dataset / model / "train" / "checkpoints" / model / "checkpoint.pt"
            if not checkpoint.exists():
                print(f"{dataset} {model}: no checkpoint at {checkpoint} (run bench_real_data.py first)")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                calcs = {p: load_ours(with_precision(checkpoint, p, Path(tmp))) for p in PRECISIONS}
            if args.ablation:
                test, path = next(iter(spec["tests"].items()))
                frames = read_frames(path)
                frames = frames[: args.frames] if args.frames else frames
                for row in ablation(calcs, frames, args.parts):
                    rows.append(dict(row, dataset=dataset, test=test, model=model, frames=len(frames)))
                continue
            md = None  # once per data set and model, from the first test file's first frame
            for test, path in spec["tests"].items():
                frames = read_frames(path)
                frames = frames[: args.frames] if args.frames else frames
                out, seconds = {}, {}
                for precision, calc in calcs.items():
                    start = time.perf_counter()
                    out[precision] = predict_ours(calc, frames, stress=False)
                    seconds[precision] = time.perf_counter() - start
                natoms = np.array([len(a) for a in frames])
                de = np.abs(out["bf16"]["energy"] - out["fp32"]["energy"]) * 1000  # meV
                df = np.abs(out["bf16"]["forces"] - out["fp32"]["forces"]) * 1000  # meV/A
                errors = {p: metrics_of(frames, out[p]["energy"], out[p]["forces"]) for p in PRECISIONS}
                if md is None:
                    md = {p: nve(calcs[p], frames[0], args.md_steps, args.timestep, args.temperature)
                          for p in PRECISIONS}  # fmt: skip
                row = dict(
                    dataset=dataset, test=test, model=model, frames=len(frames), errors=errors,
                    energy_diff_mean=float(de.mean()), energy_diff_max=float(de.max()),
                    energy_diff_per_atom=float((de / natoms).mean()),
                    force_diff_mean=float(df.mean()), force_diff_max=float(df.max()),
                    seconds=seconds, md=md,
                )  # fmt: skip
                rows.append(row)
                print(row, flush=True)

    if args.ablation:
        lines = [
            f"bf16 with parts in float32, against fp32 ({args.threads} threads)",
            "",
            "| data set / test (frames) | model | float32 parts | bf16 - fp32 forces mean / max (meV/A) "
            "| share of force MAE | inference s | speed-up over fp32 |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['dataset']} / {r['test']} ({r['frames']}) | {r['model']} | {r['part']} "
            f"| {r['force_diff_mean']:.2f} / {r['force_diff_max']:.1f} | {r['share']:.2%} "
            f"| {r['seconds']:.2f} | x{r['speedup']:.2f} |"
            for r in rows
        ]
    else:
        lines = table_lines(rows, args)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


def table_lines(rows: list[dict], args) -> list[str]:
    lines = [
        f"bf16 against fp32, same checkpoints ({args.threads} threads; NVE {args.md_steps} steps of "
        f"{args.timestep} fs from {args.temperature:g} K)",
        "",
        "| data set / test | model | force MAE fp32 / bf16 (meV/A) | energy MAE fp32 / bf16 (meV) "
        "| bf16 - fp32 forces mean / max (meV/A) | share of force MAE | bf16 - fp32 energy mean / max (meV) "
        "| inference fp32 / bf16 (s) | NVE drift fp32 / bf16 (meV/atom/ps) | NVE max excursion fp32 / bf16 "
        "(meV/atom) | shortest distance fp32 / bf16 (A) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, md = r["errors"], r["md"]
        lines.append(
            f"| {r['dataset']} / {r['test']} ({r['frames']}) | {r['model']} "
            f"| {e['fp32']['forces_mae']:.1f} / {e['bf16']['forces_mae']:.1f} "
            f"| {e['fp32']['energy_mae']:.1f} / {e['bf16']['energy_mae']:.1f} "
            f"| {r['force_diff_mean']:.2f} / {r['force_diff_max']:.1f} "
            f"| {r['force_diff_mean'] / e['fp32']['forces_mae']:.2%} "
            f"| {r['energy_diff_mean']:.2f} / {r['energy_diff_max']:.2f} "
            f"| {r['seconds']['fp32']:.1f} / {r['seconds']['bf16']:.1f} "
            f"| {md['fp32']['drift']:.2f} / {md['bf16']['drift']:.2f} "
            f"| {md['fp32']['excursion']:.2f} / {md['bf16']['excursion']:.2f} "
            f"| {md['fp32']['shortest']:.2f} / {md['bf16']['shortest']:.2f} |"
        )
    return lines


if __name__ == "__main__":
    main()
