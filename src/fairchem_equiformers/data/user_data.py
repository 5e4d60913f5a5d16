"""Reading the user's labelled structures: any file ASE reads (extxyz, ASE db, .traj, VASP OUTCAR, ...).

Labels, per frame:

- energy (eV): the calculator's ``energy`` (what ASE attaches for extxyz ``energy=``, db rows,
  trajectories, OUTCARs), or ``atoms.info[energy_key]``;
- forces [N, 3] (eV/A): the calculator's ``forces``, or ``atoms.arrays[forces_key]``;
- stress [3, 3] (eV/A^3, ASE's sign: ``(1/V) dE/d(strain)``, positive when the cell pulls
  inwards), optional: the calculator's ``stress`` (Voigt or 3x3), or ``atoms.info[stress_key]``,
  or a virial ``atoms.info["virial"]`` / ``["virials"]`` (eV, MACE's and nequip's key) converted as
  ``stress = -virial / V``. Only fully periodic frames carry a stress.

A frame is bad when it has no atoms, an unknown element (ASE's dummy ``X`` included), a missing or
non-finite label, forces of the wrong shape, or two atoms closer than ``MIN_DISTANCE`` (periodic
images included). ``read_frames`` raises ``DataBuildError`` naming the file and frame, or, with
``skip_bad=True``, yields a ``BadFrame`` with the reason instead.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from ase.neighborlist import neighbor_list
from scipy.spatial import cKDTree

from .errors import DataBuildError
from .frames import Frame

MIN_DISTANCE = 0.5  # A: closer atoms are an input error (shortest real bond, H2: 0.74 A)
VIRIAL_KEYS = ("virial", "virials")


@dataclass(frozen=True)
class LabelKeys:
    """Where the labels are when not in the calculator results (``None``: the calculator's)."""

    energy: str | None = None
    forces: str | None = None
    stress: str | None = None


@dataclass(frozen=True)
class BadFrame:
    """A frame that failed a check: ``where`` names the file and frame, ``reason`` the check."""

    where: str
    reason: str


def expand_inputs(patterns: Iterable[str | Path]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs, in order, each glob sorted, no duplicates).

    Raises ``DataBuildError`` for a path that does not exist or a glob that matches no file.
    """
    files: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            matches = sorted(
                Path(match) for match in glob.glob(text, recursive=True) if Path(match).is_file()
            )
            if not matches:
                raise DataBuildError(f"no input file matches {text!r}")
        else:
            if not Path(text).is_file():
                raise DataBuildError(f"input file not found: {text}")
            matches = [Path(text)]
        files.extend(match for match in matches if match not in files)
    return files


def _iread(path: Path) -> Iterator[Atoms]:
    """All frames of ``path``, with ASE's reading errors turned into ``DataBuildError``."""
    if not path.is_file():
        raise DataBuildError(f"input file not found: {path}")
    try:
        yield from ase.io.iread(str(path), index=":")
    except KeyError as exc:  # ASE's parsers fail on an unknown chemical symbol with KeyError
        key = exc.args[0] if exc.args else ""
        if isinstance(key, str) and key not in atomic_numbers:
            raise DataBuildError(f"{path}: unknown element {key!r}") from None
        raise DataBuildError(f"cannot read {path} with ASE: missing key {key!r}") from None
    except Exception as exc:  # any parser error: unknown format, malformed file, ...
        raise DataBuildError(f"cannot read {path} with ASE: {type(exc).__name__}: {exc}") from None


def _stress(atoms: Atoms, results: dict, key: str | None) -> np.ndarray | None:
    """The frame's stress [3, 3] (eV/A^3, ASE's sign), or ``None`` when it has none."""
    if key is not None:
        value = atoms.info.get(key)
    else:
        value = results.get("stress")
        if value is None:
            virial = next((atoms.info[name] for name in VIRIAL_KEYS if name in atoms.info), None)
            if virial is None:
                return None
            if not atoms.pbc.all():
                raise ValueError("has a virial but is not periodic in all three directions")
            return -_full_tensor(virial) / atoms.get_volume()
    if value is None:
        return None
    if not atoms.pbc.all():
        raise ValueError("has a stress but is not periodic in all three directions")
    return _full_tensor(value)


def _full_tensor(value) -> np.ndarray:
    """A symmetric 3x3 tensor from 9 values, a 3x3 array or 6 Voigt values (xx yy zz yz xz xy)."""
    array = np.asarray(value, dtype=float).reshape(-1)
    if array.size == 9:
        return array.reshape(3, 3)
    if array.size == 6:
        xx, yy, zz, yz, xz, xy = array
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise ValueError(f"has a stress/virial of {array.size} values (expected 6 or 9)")


def _check(atoms: Atoms, keys: LabelKeys) -> Frame:
    """The frame's labels and structure; ``ValueError`` with the reason when a check fails."""
    if len(atoms) == 0:
        raise ValueError("has no atoms")
    bad = sorted({int(z) for z in atoms.numbers if not 1 <= z < len(chemical_symbols)})
    if bad:
        raise ValueError(f"has unknown element(s) with atomic number {bad} (e.g. ASE's dummy 'X')")
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    energy = atoms.info.get(keys.energy) if keys.energy else results.get("energy")
    forces = atoms.arrays.get(keys.forces) if keys.forces else results.get("forces")
    if energy is None or forces is None:
        missing = " and ".join(
            name for name, value in (("energy", energy), ("forces", forces)) if value is None
        )
        where = (
            f"keys {keys.energy!r}/{keys.forces!r}" if keys.energy or keys.forces else "calculator results"
        )
        raise ValueError(f"has no {missing} (read from {where}); every frame needs an energy and forces")
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (len(atoms), 3):
        raise ValueError(f"forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
    stress = _stress(atoms, results, keys.stress)
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        atom = int(np.argwhere(~np.isfinite(forces))[0][0]) if not np.isfinite(forces).all() else None
        raise ValueError("energy is not finite" if atom is None else f"forces of atom {atom} are not finite")
    if stress is not None and not np.isfinite(stress).all():
        raise ValueError("stress is not finite")
    _check_distances(atoms)
    structure = atoms.copy()
    structure.calc = None
    return Frame(atoms=structure, energy=float(energy), forces=forces, stress=stress)


def _check_distances(atoms: Atoms) -> None:
    """``ValueError`` naming the closest pair of atoms closer than ``MIN_DISTANCE``: a k-d tree
    for molecules (ASE's neighbour list takes 0.5 s for a molecule in a 50 A box without
    periodic boundaries), ASE's periodic neighbour list otherwise."""
    if not atoms.pbc.any():
        pairs = cKDTree(atoms.positions).query_pairs(MIN_DISTANCE, output_type="ndarray")  # [P, 2]
        first, second = pairs.T
        distance = np.linalg.norm(atoms.positions[first] - atoms.positions[second], axis=1)
    else:
        first, second, distance = neighbor_list("ijd", atoms, MIN_DISTANCE, self_interaction=False)
    if len(distance):
        k = int(np.argmin(distance))
        raise ValueError(
            f"atoms {first[k]} and {second[k]} are {distance[k]:.3f} A apart (overlapping atoms: "
            f"closer than {MIN_DISTANCE} A, periodic images included)"
        )


def read_frames(
    path: Path, keys: LabelKeys = LabelKeys(), skip_bad: bool = False
) -> Iterator[Frame | BadFrame]:
    """Yield every frame of ``path`` checked (see the module docstring), in file order.

    A bad frame raises ``DataBuildError`` naming ``path`` and the frame index, or with
    ``skip_bad`` is yielded as a ``BadFrame``.
    """
    for index, atoms in enumerate(_iread(path)):
        where = f"{path} frame {index}"
        try:
            yield _check(atoms, keys)
        except ValueError as exc:
            if not skip_bad:
                raise DataBuildError(f"{where} {exc}") from None
            yield BadFrame(where=where, reason=str(exc))


def read_isolated_atoms(path: Path, energy_key: str | None = None) -> dict[int, float]:
    """Isolated-atom energies (eV) by atomic number from single-atom frames of ``path`` (MACE's E0s).

    Raises ``DataBuildError`` for a frame of more than one atom, without an energy, or an element
    given twice with different energies.
    """
    energies: dict[int, float] = {}
    for index, atoms in enumerate(_iread(path)):
        where = f"{path} frame {index}"
        if len(atoms) != 1:
            raise DataBuildError(f"{where} has {len(atoms)} atoms; an isolated-atom file holds single atoms")
        results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        energy = atoms.info.get(energy_key) if energy_key else results.get("energy")
        if energy is None or not np.isfinite(energy):
            raise DataBuildError(f"{where} has no finite energy")
        z = int(atoms.numbers[0])
        if z in energies and abs(energies[z] - energy) > 1e-8:
            raise DataBuildError(f"{where}: {chemical_symbols[z]} is given twice with different energies")
        energies[z] = float(energy)
    if not energies:
        raise DataBuildError(f"{path} holds no structures")
    return energies
