"""Float64 rotation error of every family's defaults and of every shipped config's model.

Each model is built as configured (random weights, seed 0, then nudged by 0.02 N(0, 1) away from
the symmetric initial norms), in float64 and eval mode, and run on a rattled Cu(111) slab with
an O adsorbate (periodic models) or an ethanol molecule (molecular models) and on three random
rotations of it. Reported: the largest relative energy error ``|E(Rx) - E(x)| / |E(x)|`` and
force error ``max |F(Rx) - R F(x)| / max |F(x)|`` (QM9 models: their target and, for a dipole
head, the dipole vector). The EquiformerV2 family's S2 grids make its
error finite; gate activations (V1 and the DEQ over it, E2Former) are exact to round-off.

    python benchmarks/bench_symmetry.py [--only NAME ...] [--results benchmarks/results/symmetry.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from e3nn import o3
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import load_config
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs

import fairchem_equiformers  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {  # each family's defaults, and the DEQ's backbone without the DEQ
    "EquiformerV2()": ("fairchem_equiformers.EquiformerV2", {}),
    "EquiformerV2(direct_forces=False)": ("fairchem_equiformers.EquiformerV2", {"direct_forces": False}),
    "EquiformerV2(num_layers=2)": ("fairchem_equiformers.EquiformerV2", {"num_layers": 2}),
    "DEQEquiformerV2()": ("fairchem_equiformers.DEQEquiformerV2", {}),
    "EquiformerV1()": ("fairchem_equiformers.EquiformerV1", {}),
    "DEQEquiformerV1()": ("fairchem_equiformers.DEQEquiformerV1", {}),
    "E2Former()": ("fairchem_equiformers.E2Former", {}),
}
NOT_MODEL_KEYS = {"name"}


def structure(periodic: bool) -> Atoms:
    if periodic:
        atoms = fcc111("Cu", size=(2, 2, 3), vacuum=7.0)
        add_adsorbate(atoms, "O", height=1.8, position="fcc")
    else:
        atoms = molecule("CH3CH2OH")
        atoms.cell = np.eye(3) * 30.0
        atoms.center()
    atoms.rattle(0.05, seed=0)
    atoms.pbc = True
    return atoms


def batch_of(atoms: Atoms, rotation: torch.Tensor | None = None):
    data = AtomsToGraphs(r_edges=False, r_pbc=True).convert(atoms)
    data.sid = 0
    data.pos, data.cell = data.pos.double(), data.cell.double()
    if rotation is not None:
        data.pos, data.cell = data.pos @ rotation.T, data.cell @ rotation.T
    return data_list_collater([data])


def rotation_errors(name: str, keys: dict, rotations: int = 3) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = registry.get_model_class(name)(**keys).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    periodic = getattr(model, "use_pbc", True)
    atoms = structure(periodic)
    start = time.perf_counter()
    base = model(batch_of(atoms))
    # the invariant output (energy, or a QM9 target) and the equivariant one (forces, or a dipole)
    scalar = "energy" if "energy" in base else next(k for k, v in base.items() if v.dim() == 1)
    vector = (
        "forces" if "forces" in base else next((k for k, v in base.items() if v.shape[-1:] == (3,)), None)
    )
    energy_error = force_error = 0.0
    for _ in range(rotations):
        rotation = o3.rand_matrix(dtype=torch.float64)
        out = model(batch_of(atoms, rotation))
        error = (out[scalar] - base[scalar]).abs().max() / base[scalar].abs().max()
        energy_error = max(energy_error, float(error))
        if vector is not None:
            error = (out[vector] - base[vector] @ rotation.T).abs().max() / base[vector].abs().max()
            force_error = max(force_error, float(error))
    return energy_error, force_error, (time.perf_counter() - start) / (rotations + 1)


def shipped_configs() -> dict[str, tuple[str, dict]]:
    models = {}
    for path in sorted((ROOT / "configs").rglob("*.yml")):
        config = load_config(str(path))[0]
        section = dict(config.get("model", {}))
        name = section.pop("name", "")
        if name.startswith("fairchem_equiformers."):
            models[str(path.relative_to(ROOT))] = (name, section)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="substrings of the model labels to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {**DEFAULTS, **shipped_configs()}
    rows = ["| model | energy error | force error | s per call |", "|---|---:|---:|---:|"]
    print(rows[0], rows[1], sep="\n")
    for label, (name, keys) in models.items():
        if args.only and not any(part in label for part in args.only):
            continue
        torch.manual_seed(1)  # the same rotations for every model
        energy, forces, seconds = rotation_errors(name, keys)
        rows.append(f"| `{label}` | {energy:.1e} | {forces:.1e} | {seconds:.1f} |")
        print(rows[-1], flush=True)
    if args.results:
        args.results.write_text(
            f"Command: `python benchmarks/bench_symmetry.py`; torch {torch.__version__}\n\n"
            + "\n".join(rows)
            + "\n"
        )


if __name__ == "__main__":
    main()
