"""A labelled structure, the unit every source produces and the LMDB writer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms


@dataclass(frozen=True)
class Frame:
    """A structure with its labels.

    ``atoms`` carries positions (A), cell, pbc, tags and ``FixAtoms``; ``energy`` is in eV (the
    adsorption energy for EMT systems, the file's energy for user data); ``forces`` is [N, 3] in
    eV/A on every atom, fixed ones included; ``stress`` (periodic user data only) is [3, 3] in
    eV/A^3 with ASE's sign, or ``None``.
    """

    atoms: Atoms
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None = None

    def max_force_norm(self) -> float:
        """Largest per-atom force norm (eV/A)."""
        return float(np.linalg.norm(self.forces, axis=1).max(initial=0.0))
