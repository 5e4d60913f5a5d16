"""GFN2-xTB (tblite) property labels of neutral closed-shell molecules, run as a script.

``python gfn2_labels.py`` reads a pickled list of ``(atomic numbers, positions in A)`` on stdin and
writes the pickled ``(labels, seconds)`` on stdout. It runs as a file, not as a module of the
package, so the fresh interpreter imports only numpy, ASE and tblite (not torch or fairchem): a
start in about a second, tblite's library loads before anything else (it needs the system
libgomp, which torch's own copy would shadow), and ``OMP_NUM_THREADS=1`` keeps the labels
bit-identical on every machine.
"""

from __future__ import annotations

import pickle
import sys
import time

import numpy as np
from ase import units

EBOHR_TO_DEBYE = units.Bohr / units.Debye  # tblite's dipole is in e*Bohr


def gfn2_properties(numbers: np.ndarray, positions: np.ndarray) -> dict[str, object]:
    """One single point: ``energy``, ``homo``, ``lumo``, ``gap`` (eV), ``dipole_moment`` (Debye)
    and ``dipole_moment_vector`` [3] (Debye)."""
    from tblite.interface import Calculator

    calculator = Calculator("GFN2-xTB", numbers, positions / units.Bohr)
    calculator.set("verbosity", 0)
    result = calculator.singlepoint()
    orbital_energies = result.get("orbital-energies") * units.Hartree  # [num_orbitals] eV
    num_occupied = round(result.get("orbital-occupations").sum() / 2)  # doubly occupied orbitals
    homo, lumo = orbital_energies[num_occupied - 1], orbital_energies[num_occupied]
    dipole = result.get("dipole") * EBOHR_TO_DEBYE  # [3] Debye
    return {
        "energy": float(result.get("energy") * units.Hartree),
        "homo": float(homo),
        "lumo": float(lumo),
        "gap": float(lumo - homo),
        "dipole_moment": float(np.linalg.norm(dipole)),
        "dipole_moment_vector": dipole,
    }


if __name__ == "__main__":
    structures = pickle.load(sys.stdin.buffer)
    start = time.perf_counter()
    labels = [gfn2_properties(numbers, positions) for numbers, positions in structures]
    pickle.dump((labels, time.perf_counter() - start), sys.stdout.buffer)
