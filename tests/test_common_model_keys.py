"""fairchem's common model keys (``use_pbc``, ``use_pbc_single``, ``otf_graph``, ``regress_forces``,
``max_neighbors``, ``max_radius``, ``max_num_elements``, ``enforce_max_neighbors_strictly``) are
accepted with the same meaning by every registered model of the plugin: the graph built on the fly
and the graph stored in the batch (fairchem's ``AtomsToGraphs(r_edges=True)``, as in its LMDBs,
read with ``otf_graph=False``) give the same energy and forces."""

from __future__ import annotations

import pytest
import torch
from fairchem.core.common.registry import registry
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs

import fairchem_equiformers  # noqa: F401  (registers the models)

from .conftest import TINY_V2, TINY_V3, molecule_in_box, slab_with_adsorbate
from .test_deq import TINY_DEQ
from .test_deq_v1 import TINY_DEQ_V1
from .test_e2former import TINY as TINY_E2FORMER
from .test_equiformer_v1 import TINY_V1

COMMON_KEYS = (
    "use_pbc", "use_pbc_single", "otf_graph", "regress_forces",
    "max_neighbors", "max_radius", "max_num_elements", "enforce_max_neighbors_strictly",
)  # fmt: skip
RADIUS, MAX_NEIGHBORS = 5.0, 100  # max_neighbors does not bind: fairchem's two searches agree
COMMON = dict(max_radius=RADIUS, max_neighbors=MAX_NEIGHBORS, max_num_elements=90, regress_forces=True)
DEQ_SOLVER = {"solver_eval": {"abs_tol": 0.0, "rel_tol": 1e-13, "max_iter": 200}}
# each family's tiny test model (the registered name's class name -> its model-specific keys)
TINY = {
    "EquiformerV2": {**TINY_V2, "num_layers": 1},
    "DEQEquiformerV2": {**TINY_DEQ, **DEQ_SOLVER},
    "EquiformerV1": TINY_V1,
    "DEQEquiformerV1": {**TINY_DEQ_V1, **DEQ_SOLVER},
    "E2Former": {**TINY_E2FORMER, "num_layers": 1},
    "EquiformerV3": {**TINY_V3, "num_layers": 1, "direct_prediction": False, "avg_num_nodes": 1.0},
    "EquiformerV2DeNS": {**TINY_V2, "num_layers": 1},
    "EquiformerV3DeNS": {**TINY_V3, "num_layers": 1, "avg_num_nodes": 1.0},
}
# every registered model with the keys at the top level: backbones and heads are parts of these,
# and the general ``DEQ`` takes them in its ``backbone:`` section (``DEQEquiformerV2``/``V1`` are
# that DEQ with flat keys)
MODELS = sorted(
    name
    for name in registry.mapping["model_name_mapping"]
    if name.startswith("fairchem_equiformers.")
    and not name.endswith(("Backbone", "Head"))
    and name != "fairchem_equiformers.DEQ"
)
# float64 energies [eV] and forces [eV/A] of the graph built on the fly and the stored one agree to
# round-off: the same edges in another order (largest differences measured over the models and
# both kinds of structure: 3.9e-15 eV, DEQEquiformerV1 molecules; 6.4e-16 eV/A, and 2.2e-14 eV/A
# for DEQEquiformerV1 molecules with two threads, whose inference forces go through an adjoint
# fixed-point solve)
ENERGY_ATOL, FORCE_ATOL = 2e-14, 5e-14


def model_for(name: str, **keys) -> torch.nn.Module:
    config = {k: v for k, v in TINY[name.split(".")[-1]].items() if k not in COMMON_KEYS}
    torch.manual_seed(0)
    model = registry.get_model_class(name)(**config, **keys).double().eval()
    with torch.no_grad():  # move away from the symmetric initial norms/biases (0.05 is too much
        for p in model.parameters():  # for the DEQ Equiformer on the Pt slab: its map stops contracting)
            p.add_(0.02 * torch.randn_like(p))
    return model


def batch_of(structures, radius: float | None = None, max_neighbors: int = MAX_NEIGHBORS):
    """float64 batch; with ``radius``, fairchem's stored graph (``edge_index``, ``cell_offsets``,
    ``neighbors``) of that radius and ``max_neighbors``."""
    converter = AtomsToGraphs(
        max_neigh=max_neighbors, radius=radius or 6.0, r_edges=radius is not None, r_pbc=True
    )
    data = []
    for i, atoms in enumerate(structures):
        d = converter.convert(atoms)
        d.sid, d.pos, d.cell = i, d.pos.double(), d.cell.double()
        data.append(d)
    return data_list_collater(data, otf_graph=radius is None)


@pytest.fixture(scope="module")
def structures():
    slabs = [slab_with_adsorbate("Cu", "111", "O", seed=0), slab_with_adsorbate("Pt", "100", "CO", seed=1)]
    water = molecule_in_box("H2O")
    water.rattle(0.05, seed=1)
    return {True: slabs, False: [molecule_in_box("CH3CH2OH"), water]}  # by use_pbc


def test_every_registered_model_has_a_tiny_config():
    assert MODELS and sorted(f"fairchem_equiformers.{name}" for name in TINY) == MODELS


@pytest.mark.parametrize("use_pbc", [True, False], ids=["periodic", "molecules"])
@pytest.mark.parametrize("name", MODELS)
def test_common_keys_mean_the_same_in_every_family(name, use_pbc, structures):
    keys = dict(COMMON, use_pbc=use_pbc, use_pbc_single=False, enforce_max_neighbors_strictly=True)
    otf = model_for(name, **keys, otf_graph=True)
    for key, value in {**keys, "otf_graph": True}.items():
        assert getattr(otf, key) == value, key  # the attributes fairchem's generate_graph reads
    stored = model_for(name, **keys, otf_graph=False)
    stored.load_state_dict(otf.state_dict())

    on_the_fly = otf(batch_of(structures[use_pbc]))
    from_batch = stored(batch_of(structures[use_pbc], radius=RADIUS))
    energy_difference = (from_batch["energy"] - on_the_fly["energy"]).abs().max().item()
    force_difference = (from_batch["forces"] - on_the_fly["forces"]).abs().max().item()
    print(f"{name} use_pbc={use_pbc}: |dE| {energy_difference:.1e} eV, |dF| {force_difference:.1e} eV/A")
    torch.testing.assert_close(from_batch["energy"], on_the_fly["energy"], rtol=0, atol=ENERGY_ATOL)
    torch.testing.assert_close(from_batch["forces"], on_the_fly["forces"], rtol=0, atol=FORCE_ATOL)

    # otf_graph=False really reads the batch's edges: a stored 3 A graph gives another energy
    # (ethanol's and the slabs'; the water has no pair beyond 3 A)
    shorter = stored(batch_of(structures[use_pbc], radius=3.0))["energy"]
    assert (shorter - on_the_fly["energy"])[0].abs() > 1e-3

    # the other graph keys: a per-structure search and the non-strict cap build the same graph here
    for key, value in [("use_pbc_single", True), ("enforce_max_neighbors_strictly", False)]:
        variant = model_for(name, **{**keys, key: value}, otf_graph=True)
        variant.load_state_dict(otf.state_dict())
        assert getattr(variant, key) is value
        torch.testing.assert_close(
            variant(batch_of(structures[use_pbc]))["energy"], on_the_fly["energy"], rtol=0, atol=ENERGY_ATOL
        )
    # regress_forces=False: energy only, the same energy
    energy_only = model_for(name, **{**keys, "regress_forces": False}, otf_graph=True)
    shared = energy_only.state_dict().keys()  # no force head
    energy_only.load_state_dict({k: v for k, v in otf.state_dict().items() if k in shared})
    out = energy_only(batch_of(structures[use_pbc]))
    assert "forces" not in out
    torch.testing.assert_close(out["energy"], on_the_fly["energy"], rtol=0, atol=ENERGY_ATOL)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "key,value",
    [
        ("otf_graph", "false"),
        ("use_pbc", "no"),
        ("use_pbc_single", None),
        ("enforce_max_neighbors_strictly", 2),
        ("regress_forces", "true"),
        ("max_neighbors", 0),
        ("max_neighbors", 20.5),
        ("max_radius", -1.0),
        ("max_radius", float("inf")),
        ("max_num_elements", 1),
    ],
)
def test_values_no_family_can_honour_are_errors_naming_the_key(name, key, value):
    with pytest.raises(ValueError, match=key):
        model_for(name, **{**COMMON, key: value})
