"""ASE structures to OC20-style torch_geometric ``Data`` records, through fairchem's ``AtomsToGraphs``.

Fields (OC20 names; configs map ``y -> energy`` and ``force -> forces`` with ``key_mapping``):

- ``pos`` [N, 3] float32 (A, wrapped into the cell), ``cell`` [1, 3, 3] float32 (A),
  ``atomic_numbers`` [N] uint8, ``natoms`` int, ``tags`` [N] int32 (0 subsurface, 1 surface,
  2 adsorbate), ``fixed`` [N] int32 (1 for atoms under ``FixAtoms``), ``sid`` int, ``fid`` int;
- S2EF: ``y`` float (eV), ``force`` [N, 3] float32 (eV/A, on every atom, fixed ones included);
- IS2RE/IS2RS: ``pos`` is the initial structure, ``y_init``/``y_relaxed`` float (eV),
  ``pos_relaxed`` [N, 3] float32 (A).

No edges are stored: models build the graph on the fly (``otf_graph: True``).
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from fairchem.core.preprocessing import AtomsToGraphs
from torch_geometric.data import Data

# A structure without periodic directions is centred in a cubic periodic box with this much
# vacuum on each side (fairchem's ``molecule_cell_size``): 2 x 20 A between periodic images is
# beyond any cutoff in use, so ``use_pbc: True`` models see the isolated molecule.
MOLECULE_VACUUM = 20.0

_PERIODIC = AtomsToGraphs(r_edges=False, r_fixed=True)
_MOLECULE = AtomsToGraphs(r_edges=False, r_fixed=True, molecule_cell_size=MOLECULE_VACUUM)


def structure_data(atoms: Atoms, sid: int) -> Data:
    """Structure fields of one frame (no labels); an aperiodic frame is boxed first."""
    if atoms.pbc.any():
        return _PERIODIC.convert(atoms, sid=sid)
    boxed = atoms.copy()
    boxed.cell = np.zeros((3, 3))
    return _MOLECULE.convert(boxed, sid=sid)


def s2ef_data(atoms: Atoms, energy: float, forces: np.ndarray, sid: int, fid: int) -> Data:
    """One S2EF frame: structure plus ``y`` (eV) and ``force`` [N, 3] (eV/A)."""
    data = structure_data(atoms, sid)
    data.fid = fid
    data.y = float(energy)
    data.force = torch.tensor(np.asarray(forces), dtype=torch.float32).reshape(len(atoms), 3)
    return data


def is2re_data(initial: Atoms, relaxed: Atoms, y_init: float, y_relaxed: float, sid: int) -> Data:
    """One IS2RE/IS2RS record: the initial structure, its energy and the relaxed energy/positions."""
    data = structure_data(initial, sid)
    data.fid = 0
    data.y_init = float(y_init)
    data.y_relaxed = float(y_relaxed)
    data.pos_relaxed = structure_data(relaxed, sid).pos
    return data
