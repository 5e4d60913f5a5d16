"""OC20-like metal slabs for EMT: facets, sizes, tags, fixed atoms and adsorption sites.

Tags follow OC20: 0 = subsurface (fixed with ``FixAtoms``), 1 = surface (free), 2 = adsorbate.
The top ``FREE_LAYERS`` layers are the free surface; the layers below are fixed. Slabs are fully
periodic (as in OC20) with ``VACUUM`` A of vacuum above and below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.build import fcc100, fcc110, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import BFGS

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
FACETS = {"fcc111": fcc111, "fcc100": fcc100, "fcc110": fcc110}
# (repeats along a, repeats along b, layers): 16, 27 or 36 metal atoms
SIZES = ((2, 2, 4), (3, 3, 3), (3, 3, 4))
FREE_LAYERS = 2
VACUUM = 8.0  # A on each side
# ASE's site names per facet, and the starting height (A) of the binding atom above the top layer
SITES = {
    "fcc111": ("ontop", "bridge", "fcc", "hcp"),
    "fcc100": ("ontop", "bridge", "hollow"),
    "fcc110": ("ontop", "shortbridge", "longbridge", "hollow"),
}
SITE_HEIGHT = {"ontop": 2.0, "bridge": 1.7, "shortbridge": 1.7, "longbridge": 1.4, "fcc": 1.4, "hcp": 1.4}
HOLLOW_HEIGHT = {"fcc100": 1.3, "fcc110": 1.1}
RELAX_FMAX = 0.05  # eV/A
CLEAN_RELAX_STEPS = 300


@dataclass(frozen=True)
class SlabKey:
    """Identifies one clean slab: metal symbol, facet name, size (a, b, layers)."""

    metal: str
    facet: str
    size: tuple[int, int, int]


def site_height(facet: str, site: str) -> float:
    """Starting height (A) of the binding atom above the top layer at ``site`` of ``facet``."""
    return HOLLOW_HEIGHT[facet] if site == "hollow" else SITE_HEIGHT[site]


def build_slab(key: SlabKey) -> Atoms:
    """Unrelaxed slab with OC20 tags (0/1), bottom layers fixed, pbc on all axes."""
    slab = FACETS[key.facet](key.metal, size=key.size, vacuum=VACUUM)
    layer_from_top = slab.get_tags()  # ASE numbers layers from the top, starting at 1
    slab.set_tags(np.where(layer_from_top <= FREE_LAYERS, 1, 0))
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    slab.pbc = True
    return slab


def relaxed_clean_slab(key: SlabKey) -> tuple[Atoms, float]:
    """The clean slab relaxed with EMT/BFGS to ``RELAX_FMAX``, and its energy (eV)."""
    slab = build_slab(key)
    slab.calc = EMT()
    BFGS(slab, logfile=None).run(fmax=RELAX_FMAX, steps=CLEAN_RELAX_STEPS)
    energy = float(slab.get_potential_energy())
    slab.calc = None
    return slab, energy
