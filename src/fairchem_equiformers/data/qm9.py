"""QM9-style molecular property data: perturbed conformers of small C/H/N/O/F molecules labelled
with GFN2-xTB (tblite) single points, written as LMDBs that fairchem's ``lmdb`` dataset reads.

QM9 (Ramakrishnan et al. 2014) holds ~134k small organic molecules (up to 9 heavy atoms of
C/N/O/F) with DFT properties; models regress one property at a time on a random split. Here the
molecules are the closed-shell, neutral members of ASE's G2 set made of those elements (73, up to
6 heavy atoms); conformer ``k`` is molecule ``k mod 73`` at its G2 geometry, randomly rotated and
with every coordinate displaced by a Gaussian of ``rattle`` A, so each molecule contributes many
conformers whose labels differ. Conformers are split at random (QM9 style), so a molecule has
conformers in every split: the task is the property surface around known molecules, not
generalisation to unseen ones.

Labels of each conformer (one GFN2-xTB single point, tblite, one thread):

- ``energy`` total energy (eV);
- ``homo``, ``lumo``, ``gap`` orbital energies of the highest occupied / lowest unoccupied
  orbital and their difference (eV);
- ``dipole_moment`` |mu| (Debye, QM9's unit) and ``dipole_moment_vector`` [1, 3] (Debye), the
  dipole of the GFN2-xTB density (neutral molecules: independent of the origin).

Layout under ``out``: ``properties/{train,val,test}`` (``data.lmdb``, ``metadata.npz``),
``element_references.pt`` (a linear per-element reference of ``energy``), ``normalizers.pt``
(mean/rmsd of referenced ``energy``, ``homo``, ``lumo``, ``gap`` on the train split; the dipole
is predicted in Debye without one), ``manifest.json`` and ``dataset.yml``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule
from ase.collections import g2
from torch_geometric.data import Data

from .errors import DataBuildError
from .lmdb_writer import SplitWriters
from .oc20_format import structure_data
from .output import staged_output
from .pipeline import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    PROPERTIES,
    BuildReport,
    finish_dataset,
)
from .references import fit_property_references
from .splits import assign_splits, present_splits

ELEMENTS = frozenset("CHNOF")
MAX_HEAVY_ATOMS = 12
DEFAULT_CONFORMERS = 3000
DEFAULT_RATTLE = 0.05  # A, per coordinate: energies spread by ~0.5 eV around each G2 geometry
SCALAR_TARGETS = ("energy", "homo", "lumo", "gap")
DIPOLE_TARGETS = ("dipole_moment", "dipole_moment_vector")


def _is_qm9_like(atoms: Atoms) -> bool:
    """C/H/N/O/F only, at least two atoms, at most ``MAX_HEAVY_ATOMS`` heavy atoms, closed shell
    (even electron count and no unpaired spins in the G2 reference)."""
    symbols = atoms.get_chemical_symbols()
    heavy = sum(symbol != "H" for symbol in symbols)
    closed_shell = atoms.numbers.sum() % 2 == 0 and not atoms.get_initial_magnetic_moments().any()
    return set(symbols) <= ELEMENTS and len(atoms) >= 2 and heavy <= MAX_HEAVY_ATOMS and closed_shell


QM9_MOLECULES = tuple(name for name in g2.names if _is_qm9_like(molecule(name)))


def conformer(index: int, seed: int, rattle: float = DEFAULT_RATTLE) -> Atoms:
    """Conformer ``index``: molecule ``QM9_MOLECULES[index % len]``, rotated uniformly at random
    and rattled (its own generator, so a conformer does not depend on how many are built)."""
    atoms = molecule(QM9_MOLECULES[index % len(QM9_MOLECULES)])
    atoms.set_initial_magnetic_moments(None)
    rng = np.random.default_rng([seed, index, 0x9])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix
    if np.linalg.det(rotation) < 0:
        rotation[:, 0] *= -1
    centred = atoms.positions - atoms.positions.mean(axis=0)
    atoms.positions = centred @ rotation.T + rng.normal(scale=rattle, size=centred.shape)
    return atoms


def label_conformers(structures: list[Atoms]) -> tuple[list[dict[str, object]], float]:
    """GFN2-xTB labels of every structure (``gfn2_labels``, in one fresh single-threaded
    interpreter) and the seconds the single points took."""
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("gfn2_labels.py"))],
        input=pickle.dumps([(atoms.numbers, atoms.positions) for atoms in structures]),
        capture_output=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if result.returncode != 0:
        raise DataBuildError(f"GFN2-xTB labelling failed: {result.stderr.decode()[-2000:]}")
    return pickle.loads(result.stdout)


def property_data(atoms: Atoms, labels: dict[str, object], sid: int) -> Data:
    """One record: the boxed, non-periodic structure plus the labels (system level)."""
    data = structure_data(atoms, sid)
    data.fid = 0
    for name in (*SCALAR_TARGETS, "dipole_moment"):
        data[name] = float(labels[name])
    data.dipole_moment_vector = torch.tensor(labels["dipole_moment_vector"], dtype=torch.float32).view(1, 3)
    return data


def build_qm9_dataset(
    out: Path,
    *,
    num_conformers: int = DEFAULT_CONFORMERS,
    seed: int = 0,
    rattle: float = DEFAULT_RATTLE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    overwrite: bool = False,
) -> BuildReport:
    """Build ``num_conformers`` labelled conformers and write the dataset under ``out`` (module
    docstring). Conformer ``k`` gets ``sid = k``. Every file but ``dataset.yml`` (which names
    ``out``) depends only on the arguments; ``report.seconds["labelling"]`` is the GFN2-xTB time."""
    if num_conformers < 1 or not 0.0 <= rattle <= 0.3:
        raise DataBuildError(
            f"--conformers ({num_conformers}) must be at least 1 and --rattle ({rattle} A) in [0, 0.3]"
        )
    split_of = assign_splits(num_conformers, val_fraction, test_fraction, seed)
    splits = present_splits(split_of)
    report = BuildReport(out=out, counts={}, files={})
    with staged_output(out, overwrite) as stage:
        structures = [conformer(index, seed, rattle) for index in range(num_conformers)]
        labels, seconds = label_conformers(structures)
        report.seconds = {"labelling": seconds}
        with SplitWriters(stage, PROPERTIES.task, splits) as writers:
            for sid, (atoms, label) in enumerate(zip(structures, labels)):
                writers.add(split_of[sid], property_data(atoms, label, sid))
        report.counts = writers.counts
        manifest = {
            "source": "qm9",
            "seed": seed,
            "num_conformers": num_conformers,
            "rattle_A": rattle,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "molecules": list(QM9_MOLECULES),
            "method": "GFN2-xTB single points (tblite), neutral, closed shell",
            "units": {
                "energy": "eV",
                "homo": "eV",
                "lumo": "eV",
                "gap": "eV",
                "dipole_moment": "Debye",
                "dipole_moment_vector": "Debye",
            },
        }
        fit = partial(fit_property_references, seed=seed, targets=SCALAR_TARGETS)
        report.files = finish_dataset(stage, out, splits, report.counts, manifest, fit, PROPERTIES)
    return report
