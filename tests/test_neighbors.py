"""The linear-time neighbour search gives fairchem's edges: same sources, targets and cell offsets,
in the same order, with the same ``max_neighbors`` rule (strict, and with fairchem's degeneracy
tolerance) -- on slabs, unrattled bulk (degenerate shells), a cell smaller than the cutoff, a
rattled supercell, and partly periodic slabs."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk, fcc111
from fairchem.core.common.utils import radius_graph_pbc

from fairchem_equiformers.primitives import radius_graph

from .conftest import slab_with_adsorbate, to_batch


def rattled_supercell():
    atoms = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))
    atoms.rattle(0.1, seed=3)
    return atoms


SYSTEMS = {
    "slabs": lambda: [slab_with_adsorbate("Cu", "111", "O", 0), slab_with_adsorbate("Pt", "100", "CO", 1)],
    "unrattled fcc": lambda: [bulk("Cu", "fcc", a=3.6, cubic=True)],
    "cell smaller than the cutoff": lambda: [bulk("Si", "diamond", a=5.43)],
    "rattled supercell": lambda: [rattled_supercell()],
}


@pytest.mark.parametrize("system", sorted(SYSTEMS))
@pytest.mark.parametrize(
    "max_neighbors,strict", [(100, False), (12, True), (12, False), (20, True), (20, False)]
)
def test_same_edges_as_fairchem(system, max_neighbors, strict):
    batch = to_batch(SYSTEMS[system]())
    expected_edges, expected_offsets, _ = radius_graph_pbc(batch, 6.0, max_neighbors, strict)
    pbc = torch.ones(len(batch.natoms), 3, dtype=torch.bool)
    edges, offsets = radius_graph(batch.pos, batch.natoms, batch.cell, pbc, 6.0, max_neighbors, strict)
    assert edges.shape[1] > 0
    assert torch.equal(edges, expected_edges)
    assert torch.equal(offsets, expected_offsets.float())


def test_partly_periodic_slab_as_fairchem():
    """``pbc = [True, True, False]`` (fairchem reads ``data.pbc``): a slab whose cell is shorter
    than the cutoff along z gets no images along z."""
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=1.0)
    slab.rattle(0.05, seed=1)
    batch = to_batch([slab])
    batch.pbc = torch.tensor([[True, True, False]])
    expected_edges, expected_offsets, _ = radius_graph_pbc(batch, 6.0, 100, False)
    edges, offsets = radius_graph(batch.pos, batch.natoms, batch.cell, batch.pbc, 6.0, 100, False)
    assert torch.equal(edges, expected_edges) and torch.equal(offsets, expected_offsets.float())
    assert (offsets[:, 2] == 0).all()
    everywhere, _ = radius_graph(
        batch.pos, batch.natoms, batch.cell, torch.ones(1, 3, dtype=torch.bool), 6.0, 100, False
    )
    assert everywhere.shape[1] > edges.shape[1]


def test_atoms_without_neighbours_and_single_atoms():
    """A lone atom (no edge), a graph of one atom, and an empty result keep their shapes."""
    batch = to_batch([bulk("Cu", "fcc", a=3.6, cubic=True)])
    edges, offsets = radius_graph(batch.pos, batch.natoms, batch.cell, None, 1.0, 10, True)
    assert edges.shape == (2, 0) and offsets.shape == (0, 3)
    one = torch.zeros(1, 3)
    edges, offsets = radius_graph(one, torch.tensor([1]), None, None, 5.0, 10, True)
    assert edges.shape == (2, 0)
