"""MD17-style molecular data: short MD trajectories of small organic molecules labelled with
GFN2-xTB (tblite), non-periodic, written as S2EF LMDBs that fairchem's ``lmdb`` dataset reads.

MD17 (Chmiela et al. 2017) samples DFT molecular dynamics at 500 K with a 0.5 fs step; models
train on ~1,000 random frames and are tested on the rest. Here each molecule starts from its
GFN2-xTB minimum (found from a built-in starting geometry), gets Maxwell-Boltzmann velocities at
``temperature`` and runs Langevin dynamics (0.5 fs, weak friction) on the GFN2-xTB surface; every
``stride``-th step becomes a frame. Everything is seeded: the same arguments give the same frames.

Energies are GFN2-xTB total energies (eV), forces in eV/A.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from functools import cache, partial
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.optimize import BFGS
from tqdm import tqdm

from .errors import DataBuildError
from .lmdb_writer import SplitWriters
from .oc20_format import s2ef_data
from .output import staged_output
from .pipeline import BuildReport, finish_dataset
from .references import fit_references
from .splits import assign_sizes, present_splits

TIMESTEP_FS = 0.5  # MD17's step
FRICTION_PER_FS = 0.002  # weak coupling: close to microcanonical over a few hundred steps
RELAX_FMAX = 0.01  # eV/A, for the starting minimum

# Starting geometries as z-matrices: (symbol, (atom, bond A), (atom, angle deg), (atom, dihedral deg)),
# atoms numbered from 0. Rough by design: each is relaxed with GFN2-xTB before the MD.
Z_MATRICES: dict[str, list[tuple]] = {
    # (Z)-3-hydroxyprop-2-enal, the enol form in MD17, with its O-H...O hydrogen bond
    "malonaldehyde": [
        ("C", None, None, None),
        ("C", (0, 1.36), None, None),
        ("C", (1, 1.44), (0, 120.0), None),
        ("O", (0, 1.33), (1, 124.0), (2, 0.0)),
        ("O", (2, 1.24), (1, 124.0), (0, 0.0)),
        ("H", (3, 0.98), (0, 106.0), (1, 0.0)),
        ("H", (0, 1.08), (1, 122.0), (2, 180.0)),
        ("H", (1, 1.08), (0, 120.0), (2, 180.0)),
        ("H", (2, 1.10), (1, 116.0), (0, 180.0)),
    ],
    # 2-acetoxybenzoic acid
    "aspirin": [
        ("C", None, None, None),  # 0 ring, carries COOH
        ("C", (0, 1.40), None, None),  # 1 ring, carries O-acetyl
        ("C", (1, 1.39), (0, 120.0), None),  # 2
        ("C", (2, 1.39), (1, 120.0), (0, 0.0)),  # 3
        ("C", (3, 1.39), (2, 120.0), (1, 0.0)),  # 4
        ("C", (4, 1.39), (3, 120.0), (2, 0.0)),  # 5
        ("C", (0, 1.49), (1, 122.0), (2, 180.0)),  # 6 carboxyl C
        ("O", (6, 1.22), (0, 124.0), (1, 0.0)),  # 7 carbonyl O
        ("O", (6, 1.35), (0, 114.0), (1, 180.0)),  # 8 hydroxyl O
        ("H", (8, 0.97), (6, 106.0), (0, 180.0)),  # 9
        ("O", (1, 1.39), (0, 120.0), (6, 0.0)),  # 10 ester O
        ("C", (10, 1.36), (1, 118.0), (0, 90.0)),  # 11 acetyl C
        ("O", (11, 1.20), (10, 123.0), (1, 0.0)),  # 12 acetyl O
        ("C", (11, 1.50), (10, 110.0), (1, 180.0)),  # 13 methyl C
        ("H", (13, 1.09), (11, 110.0), (10, 180.0)),
        ("H", (13, 1.09), (11, 110.0), (10, 60.0)),
        ("H", (13, 1.09), (11, 110.0), (10, -60.0)),
        ("H", (2, 1.08), (1, 120.0), (0, 180.0)),
        ("H", (3, 1.08), (2, 120.0), (1, 180.0)),
        ("H", (4, 1.08), (3, 120.0), (2, 180.0)),
        ("H", (5, 1.08), (4, 120.0), (3, 180.0)),
    ],
}
# Molecules ASE builds itself (G2 geometries), by MD17 name.
ASE_MOLECULES = {"ethanol": "CH3CH2OH", "benzene": "C6H6", "toluene": "C6H5CH3", "naphthalene": "C10H8"}
MD17_MOLECULES = tuple(sorted({*Z_MATRICES, *ASE_MOLECULES}))


def _from_z_matrix(rows: list[tuple]) -> Atoms:
    """Cartesian positions from a z-matrix (the natural extension reference frame)."""
    positions: list[np.ndarray] = []
    for index, (_, bond, angle, dihedral) in enumerate(rows):
        if index == 0:
            positions.append(np.zeros(3))
            continue
        a, length = bond
        if index == 1:
            positions.append(positions[a] + np.array([length, 0.0, 0.0]))
            continue
        b, theta = angle
        c, phi = dihedral if dihedral is not None else (None, 0.0)
        pa, pb = positions[a], positions[b]
        pc = positions[c] if c is not None else pb + np.array([0.0, 1.0, 0.0])
        bc = (pb - pc) / np.linalg.norm(pb - pc)
        ab = (pa - pb) / np.linalg.norm(pa - pb)
        normal = np.cross(bc, ab)
        normal /= np.linalg.norm(normal)
        theta, phi = math.radians(theta), math.radians(phi)
        local = length * np.array(
            [-math.cos(theta), math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi)]
        )
        frame = np.stack([ab, np.cross(normal, ab), normal], axis=1)  # columns: x, y, z of the local frame
        positions.append(pa + frame @ local)
    return Atoms([row[0] for row in rows], positions=np.array(positions))


def gfn2_calculator():
    """tblite's GFN2-xTB ASE calculator (quiet). Raises ``ImportError`` where tblite's library
    cannot load in this process (see ``md_frames``)."""
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


@cache
def _minimum(name: str) -> Atoms:
    if name in ASE_MOLECULES:
        atoms = molecule(ASE_MOLECULES[name])
    else:
        atoms = _from_z_matrix(Z_MATRICES[name])
    atoms.calc = gfn2_calculator()
    BFGS(atoms, logfile=None).run(fmax=RELAX_FMAX, steps=500)
    atoms.calc = None
    return atoms


def md_trajectory(name: str, num_frames: int, seed: int, temperature: float, stride: int) -> dict:
    """The MD of ``md_frames`` in this process (run it in a fresh one, see ``md_frames``): atomic
    numbers, positions, energies, forces."""
    atoms = _minimum(name).copy()
    atoms.center()
    atoms.calc = gfn2_calculator()
    rng = np.random.default_rng([seed, 17])
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    friction = FRICTION_PER_FS / units.fs
    dynamics = Langevin(atoms, TIMESTEP_FS * units.fs, temperature_K=temperature, friction=friction, rng=rng)
    positions, energies, forces = [], [], []
    for _ in range(num_frames):
        dynamics.run(stride)
        positions.append(atoms.positions.copy())
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    return {"numbers": atoms.numbers, "positions": positions, "energies": energies, "forces": forces}


# The MD runs in a fresh, single-threaded interpreter that imports tblite before anything else:
# tblite's library needs the system libgomp (GOMP_5.0), and once torch has loaded its own older
# copy under the same soname tblite cannot load in that process; and GFN2-xTB's threaded
# reductions differ in the last bits between thread counts, which a long trajectory amplifies,
# so one thread keeps the frames bit-identical for a seed on every machine.
_FRESH_PROCESS = """
import pickle, sys
import tblite.ase
from fairchem_equiformers.data.molecules import md_trajectory
pickle.dump(md_trajectory(*pickle.load(sys.stdin.buffer)), sys.stdout.buffer)
"""


def _trajectory_in_fresh_process(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS],
        input=pickle.dumps(args),
        capture_output=True,
        check=False,
        env=env,
    )
    if result.returncode != 0:
        raise DataBuildError(f"GFN2-xTB molecular dynamics failed: {result.stderr.decode()[-2000:]}")
    return pickle.loads(result.stdout)


def md_frames(
    name: str, num_frames: int, seed: int, temperature: float = 500.0, stride: int = 10
) -> list[Atoms]:
    """``num_frames`` frames of a GFN2-xTB Langevin trajectory of molecule ``name`` at ``temperature`` K.

    The molecule starts at rest in its GFN2-xTB minimum with Maxwell-Boltzmann velocities; a
    frame is kept every ``stride`` steps of 0.5 fs. Each frame is non-periodic and carries its
    energy (eV) and forces (eV/A) in a ``SinglePointCalculator``. Seeded and deterministic."""
    if name not in MD17_MOLECULES:
        raise DataBuildError(f"unknown molecule {name!r}; choose from {', '.join(MD17_MOLECULES)}")
    if num_frames < 1 or stride < 1 or not temperature > 0:
        raise DataBuildError(
            f"num_frames ({num_frames}) and stride ({stride}) must be at least 1, "
            f"temperature ({temperature}) positive"
        )
    args = (name, num_frames, seed, float(temperature), stride)
    trajectory = _trajectory_in_fresh_process(*args)
    frames = []
    for positions, energy, forces in zip(
        trajectory["positions"], trajectory["energies"], trajectory["forces"]
    ):
        frame = Atoms(trajectory["numbers"], positions=positions)
        frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
        frames.append(frame)
    return frames


def md17_splits(num_frames: int, train_size: int, val_size: int, seed: int) -> list[str]:
    """MD17-style split of frame indices: ``train_size`` random frames for training, ``val_size``
    for validation, the rest for testing (seeded)."""
    if train_size < 2 or val_size < 0 or train_size + val_size >= num_frames:
        raise DataBuildError(
            f"{num_frames} frames cannot hold {train_size} train (at least 2) + {val_size} val frames "
            "and a test set"
        )
    test_size = num_frames - train_size - val_size
    return assign_sizes({"train": train_size, "val": val_size, "test": test_size}, seed)


def build_md17_dataset(
    out: Path,
    *,
    molecule_name: str,
    num_frames: int = 2000,
    train_size: int = 950,
    val_size: int = 50,
    seed: int = 0,
    temperature: float = 500.0,
    stride: int = 10,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Run ``md_frames`` for one molecule and write ``s2ef/{train,val,test}`` (MD17 style: one
    dataset per molecule), fitted references, ``manifest.json`` and ``dataset.yml`` under ``out``.

    Frame ``i`` of the trajectory gets ``sid = i``, ``fid = 0``. The structures are stored
    without periodicity in fairchem's format (a large box, which non-periodic models ignore)."""
    if molecule_name not in MD17_MOLECULES:
        raise DataBuildError(f"unknown molecule {molecule_name!r}; choose from {', '.join(MD17_MOLECULES)}")
    split_of = md17_splits(num_frames, train_size, val_size, seed)
    splits = present_splits(split_of)
    report = BuildReport(out=out, counts={}, files={})
    with staged_output(out, overwrite) as stage:
        frames = md_frames(molecule_name, num_frames, seed, temperature, stride)
        with SplitWriters(stage, "s2ef", splits) as writers:
            for sid, atoms in enumerate(tqdm(frames, desc=molecule_name, disable=not progress)):
                data = s2ef_data(atoms, atoms.get_potential_energy(), atoms.get_forces(), sid=sid, fid=0)
                writers.add(split_of[sid], data)
        report.counts = writers.counts
        manifest = {
            "source": "md17",
            "molecule": molecule_name,
            "seed": seed,
            "num_frames": num_frames,
            "train_size": train_size,
            "val_size": val_size,
            "temperature_K": temperature,
            "stride": stride,
            "timestep_fs": TIMESTEP_FS,
            "friction_per_fs": FRICTION_PER_FS,
            "energy": {"y": "GFN2-xTB total energy (eV), tblite", "forces": "eV/A"},
        }
        fit = partial(fit_references, seed=seed)
        report.files = finish_dataset(stage, out, splits, report.counts, manifest, fit)
    return report
