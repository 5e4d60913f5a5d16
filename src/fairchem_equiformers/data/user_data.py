"""Reading the user's labelled structures: any file ASE reads (extxyz, ASE db, .traj, ...).

Energies (eV) and forces (eV/A) come from each frame's calculator results (what ASE attaches for
extxyz ``energy=``/``forces``, db rows and trajectories) or from ``atoms.info[energy_key]`` and
``atoms.arrays[forces_key]`` when those keys are given. Energies are stored as they are (total
energies); the fitted linear reference absorbs the per-element offsets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from .errors import DataBuildError
from .frames import Frame


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


def _labels(
    atoms: Atoms, where: str, energy_key: str | None, forces_key: str | None
) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces [N, 3] (eV/A) of one frame; ``where`` names it in errors."""
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    energy = atoms.info.get(energy_key) if energy_key else results.get("energy")
    forces = atoms.arrays.get(forces_key) if forces_key else results.get("forces")
    if energy is None or forces is None:
        missing = " and ".join(
            name for name, value in (("energy", energy), ("forces", forces)) if value is None
        )
        hint = f"keys {energy_key!r}/{forces_key!r}" if energy_key or forces_key else "calculator results"
        raise DataBuildError(
            f"{where} has no {missing} (read from {hint}); every frame needs an energy and forces"
        )
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (len(atoms), 3):
        raise DataBuildError(f"{where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        raise DataBuildError(f"{where}: energy or forces are not finite")
    return float(energy), forces


def _check_elements(atoms: Atoms, where: str) -> None:
    """Reject atomic number 0 (ASE's dummy 'X') and anything beyond the periodic table."""
    bad = sorted({int(z) for z in atoms.numbers if not 1 <= z < len(chemical_symbols)})
    if bad:
        raise DataBuildError(f"{where}: unknown element(s) with atomic number {bad} (e.g. ASE's dummy 'X')")


def read_frames(path: Path, energy_key: str | None = None, forces_key: str | None = None) -> Iterator[Frame]:
    """Yield every frame of ``path`` with its labels, raising ``DataBuildError`` on the first bad one."""
    for index, atoms in enumerate(_iread(path)):
        where = f"{path} frame {index}"
        if len(atoms) == 0:
            raise DataBuildError(f"{where} has no atoms")
        _check_elements(atoms, where)
        energy, forces = _labels(atoms, where, energy_key, forces_key)
        structure = atoms.copy()
        structure.calc = None
        yield Frame(atoms=structure, energy=energy, forces=forces)


def count_frames(path: Path, energy_key: str | None = None, forces_key: str | None = None) -> int:
    """Validate every frame of ``path`` (see ``read_frames``) and return how many there are (>= 1)."""
    count = sum(1 for _ in read_frames(path, energy_key, forces_key))
    if count == 0:
        raise DataBuildError(f"{path} holds no structures")
    return count
