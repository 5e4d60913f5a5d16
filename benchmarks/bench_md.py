"""MD throughput through the ASE calculator users run (fairchem's ``OCPCalculator`` on a
checkpoint): velocity-Verlet steps per second and ns/day at 1 fs, for each family's MD-sized
config, on periodic liquid-water boxes of about 64, 256, 1,000 and 4,000 atoms; direct and
gradient forces where the family has both; float32 and bf16 (EquiformerV2 and V3 with their
model key ``precision: bf16``, the other families under bf16 autocast); the neighbour search
timed apart (it runs inside every step). Then E2Former against EquiformerV1 (per-edge SO(3)
tensor products, what E2Former's node-level route replaces) at growing neighbour counts.

Weights are random (a checkpoint is written from a freshly initialised model): the cost of a
step does not depend on them. A size is skipped when the previous size's time per step,
scaled by the atoms, predicts more than ``--max-step-seconds``.

    python benchmarks/bench_md.py                     # --threads 1; --quick for a smoke run

``--keep-freed`` calls ``fairchem_equiformers.keep_freed_memory()`` first (what README step 4
does before MD) and names its results ``md_<date>_keep_freed``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from ase import Atoms, units
from ase.build import molecule
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from fairchem.core.common.registry import registry
from fairchem.core.common.relaxation.ase_utils import OCPCalculator
from fairchem.core.common.utils import setup_imports
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs

from fairchem_equiformers import keep_freed_memory
from fairchem_equiformers.primitives import radius_graph

ROOT = Path(__file__).resolve().parent.parent
# family -> (config, overrides for periodic water, the key and value of direct forces or None)
MODELS = {
    "EquiformerV2": ("configs/real_data/equiformer_v2_molecular_md.yml", {}, ("direct_forces", True)),
    "EquiformerV1": ("configs/md17/equiformer_v1_L2.yml", {"use_pbc": True}, None),
    "E2Former": ("configs/md17/e2former_L@2_N@6.yml", {"use_pbc": True}, None),
    "DEQ-EquiformerV2": ("configs/md17/deq_equiformer_v2_N@1_L@3_M@3.yml", {"use_pbc": True}, None),
    "EquiformerV3": (
        "configs/mptrj/equiformer_v3_grad_N@7_L@4_M@2.yml",
        {"regress_stress": False},
        ("direct_prediction", True),
    ),
}
MOLECULES = [21, 85, 333, 1333]  # water molecules: 63, 255, 999, 3,999 atoms
VOLUME_PER_MOLECULE = 29.9  # A^3: 1 g/cm^3


def water_box(molecules: int, seed: int = 0) -> Atoms:
    """Water at 1 g/cm^3 in a periodic cube: molecules on a cubic lattice, turned at random."""
    rng = np.random.default_rng(seed)
    side = math.ceil(molecules ** (1 / 3))
    length = (molecules * VOLUME_PER_MOLECULE) ** (1 / 3)
    spacing = length / side
    water = molecule("H2O")
    water.positions -= water.positions[0]
    atoms = Atoms(cell=[length] * 3, pbc=True)
    for site in range(molecules):
        copy_ = water.copy()
        copy_.rotate(rng.uniform(0, 360), rng.normal(size=3))
        index = np.array([site // side**2, (site // side) % side, site % side])
        copy_.positions += (index + 0.5) * spacing
        atoms += copy_
    return atoms


# families with the model key ``precision: bf16`` (the others run bf16 under autocast)
PRECISION_KEY = ("EquiformerV2", "EquiformerV3")


def calculator(
    family: str, direct: bool, workdir: Path, device: str = "cpu", bf16: bool = False
) -> tuple[OCPCalculator, dict]:
    """``OCPCalculator`` on a checkpoint of the family's MD config with fresh weights (seed 0,
    the same weights in both precisions)."""
    path, overrides, direct_key = MODELS[family]
    config = yaml.safe_load((ROOT / path).read_text())
    model = {**config["model"], **overrides}
    if direct:
        model[direct_key[0]] = direct_key[1]
    if bf16 and family in PRECISION_KEY:
        model["precision"] = "bf16"
    outputs = {key: config["outputs"][key] for key in ("energy", "forces")}
    full = {
        "trainer": config["trainer"], "model": model, "outputs": outputs,
        "loss_functions": [l for l in config["loss_functions"] if next(iter(l)) in outputs],
        "evaluation_metrics": {
            "metrics": {"energy": ["mae"], "forces": ["mae"]}, "primary_metric": "forces_mae"
        },
        "optim": config.get("optim", {}), "dataset": {"src": "none"}, "task": {}, "cmd": {"seed": 0},
    }  # fmt: skip
    kwargs = dict(model)
    torch.manual_seed(0)
    network = registry.get_model_class(kwargs.pop("name"))(**kwargs)
    checkpoint = workdir / f"{family}_{'direct' if direct else 'gradient'}_{'bf16' if bf16 else 'fp32'}.pt"
    torch.save(
        {"state_dict": network.state_dict(), "config": full, "normalizers": {}, "ema": None, "amp": None},
        checkpoint,
    )
    return OCPCalculator(checkpoint_path=str(checkpoint), cpu=device == "cpu", seed=0), model


def search_seconds(atoms: Atoms, model: dict, repeats: int = 3) -> tuple[float, int]:
    """The neighbour search's time (best of ``repeats``) and edge count for ``atoms``."""
    batch = data_list_collater([AtomsToGraphs(r_edges=False, r_pbc=True).convert(atoms)])
    best, edges = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        edge_index, _ = radius_graph(
            batch.pos, batch.natoms, batch.cell, torch.ones(1, 3, dtype=torch.bool),
            model["max_radius"], model["max_neighbors"], model.get("enforce_max_neighbors_strictly", True),
        )  # fmt: skip
        best, edges = min(best, time.perf_counter() - start), edge_index.shape[1]
    return best, edges


def md_seconds_per_step(
    atoms: Atoms, calc: OCPCalculator, steps: int, bf16: bool, device: str = "cpu"
) -> float:
    """Velocity Verlet at 1 fs from 300 K velocities: one step to warm up, then ``steps`` timed."""
    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    autocast = bf16 and calc.trainer.config["model"].get("precision", "fp32") == "fp32"
    with bf16_forward(calc.trainer.model, device) if autocast else contextlib.nullcontext():
        dynamics.run(1)
        start = time.perf_counter()
        dynamics.run(steps)
    return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def bf16_forward(model: torch.nn.Module, device: str):
    """The model's forward under bf16 autocast, its outputs returned in float32 (the calculator
    converts them to numpy, which has no bf16)."""
    plain = model.forward

    def forward(data):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = plain(data)
        return {key: value.float() for key, value in out.items()}

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point")
    parser.add_argument("--max-step-seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="63 atoms only, one step: a smoke run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="append every row to this file (one JSON line each)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "md_throughput.png"))
    parser.add_argument("--keep-freed", action="store_true", help="glibc keeps freed memory")
    parser.add_argument("--no-scaling", action="store_true", help="no E2Former against V1 at growing cutoffs")
    args = parser.parse_args()
    if args.keep_freed:
        assert keep_freed_memory()
    logging.getLogger().setLevel(logging.ERROR)
    setup_imports()
    torch.set_num_threads(args.threads)
    sizes = MOLECULES[:1] if args.quick else MOLECULES
    steps = 1 if args.quick else args.steps
    boxes = {n: water_box(n) for n in sizes}
    rows, scaling = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.models:
            for direct in (False, True) if MODELS[family][2] else (False,):
                for bf16 in (False, True):
                    calc, model = calculator(family, direct, Path(tmp), args.device, bf16)
                    previous = None
                    for n in sizes:
                        atoms = boxes[n]
                        row = {"model": family, "forces": "direct" if direct else "gradient",
                               "precision": "bf16" if bf16 else "fp32", "atoms": len(atoms)}  # fmt: skip
                        if previous and previous[1] * len(atoms) / previous[0] > args.max_step_seconds:
                            rows.append({**row, "skipped": True})
                            continue
                        seconds = md_seconds_per_step(atoms, calc, steps, bf16, args.device)
                        search, edges = search_seconds(atoms, model)
                        row.update(seconds=seconds, search=search, edges=edges)
                        rows.append(row)
                        previous = (len(atoms), seconds)
                        print(row, flush=True)
                        if args.json:
                            with open(args.json, "a") as file:
                                file.write(
                                    json.dumps({"benchmark": "MD", "device": args.device, **row}) + "\n"
                                )
        if not (args.quick or args.no_scaling):
            box = boxes[MOLECULES[0]]
            for cutoff in (3.0, 4.0, 5.0, 6.0):
                for family in ("EquiformerV1", "E2Former"):
                    path, overrides, _ = MODELS[family]
                    MODELS[family] = (path, {**overrides, "max_radius": cutoff, "max_neighbors": 1000}, None)
                    calc, model = calculator(family, False, Path(tmp), args.device)
                    MODELS[family] = (path, overrides, None)
                    _, edges = search_seconds(box, model, repeats=1)
                    seconds = md_seconds_per_step(box, calc, steps, False, args.device)
                    scaling.append(
                        {
                            "model": family,
                            "cutoff": cutoff,
                            "neighbours": edges / len(box),
                            "seconds": seconds,
                        }
                    )
                    print(scaling[-1], flush=True)
    report(rows, scaling, args)


def table_row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def report(rows: list[dict], scaling: list[dict], args) -> None:
    date = datetime.date.today().isoformat()
    command = f"python benchmarks/bench_md.py --threads {args.threads} --steps {args.steps}"
    command += f" --device {args.device}{' --quick' * args.quick}{' --keep-freed' * args.keep_freed}"
    command += f" --models {' '.join(args.models)}"
    columns = ("model", "forces", "precision", "atoms", "edges", "s/step", "steps/s", "ns/day", "ms/atom")
    lines = [
        f"# MD throughput through OCPCalculator ({date})", "",
        f"Command: `{command}`. {platform.processor() or platform.machine()}, torch {torch.__version__}.",
        "Periodic water boxes at 1 g/cm^3, velocity Verlet at 1 fs, random weights; search: the neighbour",
        "search alone (it runs inside each step). ns/day at 1 fs per step.", "",
        table_row(*columns, "search ms", "search share"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        system = (r["model"], r["forces"], r["precision"], f"{r['atoms']:,}")
        if r.get("skipped"):
            skipped = f"skipped (> {args.max_step_seconds:g} s predicted)"
            lines.append(table_row(*system, "", skipped, *[""] * 5))
            continue
        rate = 1 / r["seconds"]
        lines.append(
            table_row(
                *system, f"{r['edges']:,}", f"{r['seconds']:.3f}", f"{rate:.2f}",
                f"{rate * 86400 * 1e-6:.4f}", f"{1e3 * r['seconds'] / r['atoms']:.2f}",
                f"{1e3 * r['search']:.1f}", f"{r['search'] / r['seconds']:.1%}",
            )
        )  # fmt: skip
    fp32 = {
        (r["model"], r["forces"], r["atoms"]): r for r in rows if r["precision"] == "fp32" and "seconds" in r
    }
    bf16 = [r for r in rows if r["precision"] == "bf16" and "seconds" in r]
    ratios = [
        f"{r['model']} {r['forces']} {r['atoms']}: x{fp32[key]['seconds'] / r['seconds']:.2f}"
        for r in bf16
        if (key := (r["model"], r["forces"], r["atoms"])) in fp32
    ]
    lines += ["", "bf16 autocast speed-up over fp32 (same model, same box): " + "; ".join(ratios)]
    if scaling:
        atoms = MOLECULES[0] * 3
        title = f"E2Former against EquiformerV1, gradient forces, fp32, {atoms} atoms, growing cutoff:"
        columns = ("cutoff A", "neighbours per atom", "EquiformerV1 s/step", "E2Former s/step")
        lines += ["", title, "", table_row(*columns, "V1 / E2Former"), "|---:|---:|---:|---:|---:|"]
        for cutoff in sorted({s["cutoff"] for s in scaling}):
            v1, e2 = (
                next(s for s in scaling if s["cutoff"] == cutoff and s["model"] == m)
                for m in ("EquiformerV1", "E2Former")
            )
            lines.append(
                table_row(
                    f"{cutoff:g}", f"{v1['neighbours']:.1f}", f"{v1['seconds']:.3f}", f"{e2['seconds']:.3f}",
                    f"x{v1['seconds'] / e2['seconds']:.2f}",
                )
            )  # fmt: skip
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.quick:
        return
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = f"md_{date}{'_keep_freed' if args.keep_freed else ''}"
    (results / f"{name}.md").write_text(text)
    (results / f"{name}.json").write_text(json.dumps({"rows": rows, "scaling": scaling}, indent=1))
    plot(rows, args.plot)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in rows:
        if "seconds" in r:
            series.setdefault(f"{r['model']} {r['forces']} {r['precision']}", []).append(
                (r["atoms"], r["seconds"])
            )
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(series), 2)))
    for color, (label, points) in zip(colors, series.items()):
        x, y = zip(*points)
        axis.plot(x, y, "o--" if "bf16" in label else "o-", color=color, label=label)
    axis.set(xscale="log", yscale="log", xlabel="atoms (water)", ylabel="seconds per MD step",
             title="MD step time through OCPCalculator (CPU)")  # fmt: skip
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
