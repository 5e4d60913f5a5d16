"""Adsorbates and the OC20-style gas-phase energy references, both computed with ASE's EMT.

Adsorption energies follow OC20: ``E_ads = E(slab+adsorbate) - E(relaxed clean slab) -
sum_i E_ref(element_i)`` over the adsorbate's atoms, with atomic references from relaxed gas
molecules (all in eV)::

    E_ref(H) = E(H2) / 2
    E_ref(O) = E(H2O) - E(H2)
    E_ref(C) = E(CO) - E(H2O) + E(H2)
    E_ref(N) = E(N2) / 2
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.optimize import BFGS

# Binding atom first, at the origin, the rest above it (+z); bond lengths are EMT's own
# adsorbed-state equilibria (A), so a fresh adsorbate starts near its relaxed shape.
ADSORBATES: dict[str, tuple[tuple[str, tuple[float, float, float]], ...]] = {
    "O": (("O", (0.0, 0.0, 0.0)),),
    "H": (("H", (0.0, 0.0, 0.0)),),
    "N": (("N", (0.0, 0.0, 0.0)),),
    "C": (("C", (0.0, 0.0, 0.0)),),
    "OH": (("O", (0.0, 0.0, 0.0)), ("H", (0.0, 0.0, 1.20))),
    "CO": (("C", (0.0, 0.0, 0.0)), ("O", (0.0, 0.0, 1.13))),
    "NH": (("N", (0.0, 0.0, 0.0)), ("H", (0.0, 0.0, 1.24))),
    "CH": (("C", (0.0, 0.0, 0.0)), ("H", (0.0, 0.0, 1.20))),
    "NO": (("N", (0.0, 0.0, 0.0)), ("O", (0.0, 0.0, 1.17))),
}

GAS_MOLECULES = ("H2", "H2O", "CO", "N2")
GAS_FMAX = 1e-3  # eV/A


def adsorbate_atoms(name: str, rng: np.random.Generator, max_tilt_deg: float = 15.0) -> Atoms:
    """The adsorbate ``name`` with its binding atom at the origin, randomly tilted and spun about z."""
    symbols = [symbol for symbol, _ in ADSORBATES[name]]
    positions = np.array([xyz for _, xyz in ADSORBATES[name]])
    atoms = Atoms(symbols, positions=positions)
    if len(atoms) > 1:
        atoms.rotate(rng.uniform(0.0, max_tilt_deg), "x", center=(0, 0, 0))
        atoms.rotate(rng.uniform(0.0, 360.0), "z", center=(0, 0, 0))
    return atoms


def gas_energies() -> dict[str, float]:
    """EMT energies (eV) of the relaxed gas molecules H2, H2O, CO, N2 (no periodicity)."""
    energies = {}
    for name in GAS_MOLECULES:
        gas = molecule(name)
        gas.calc = EMT()
        BFGS(gas, logfile=None).run(fmax=GAS_FMAX, steps=500)
        energies[name] = float(gas.get_potential_energy())
    return energies


def atomic_references(gas: dict[str, float]) -> dict[str, float]:
    """Per-element reference energies (eV) from the gas energies, OC20's scheme (module docstring)."""
    oxygen = gas["H2O"] - gas["H2"]
    return {
        "H": gas["H2"] / 2,
        "O": oxygen,
        "C": gas["CO"] - oxygen,
        "N": gas["N2"] / 2,
    }


def reference_energy(symbols: list[str], references: dict[str, float]) -> float:
    """Sum of the atomic references (eV) of the given adsorbate atoms."""
    return float(sum(references[symbol] for symbol in symbols))
