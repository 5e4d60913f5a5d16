"""Shared fixtures: small OC20-like structures built with ASE, batched the fairchem way, and
GFN2-xTB ethanol MD frames for the molecular learning tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.db import connect
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs

from fairchem_equiformers.data.molecules import md_frames


def slab_with_adsorbate(metal: str, facet: str, adsorbate: str, seed: int) -> Atoms:
    """A small OC20-style slab (bottom layer fixed, tags 0/1/2) with an adsorbate, rattled."""
    build = {"111": fcc111, "100": fcc100}[facet]
    slab = build(metal, size=(2, 2, 3), vacuum=7.0)
    slab.set_tags(np.where(slab.positions[:, 2] > slab.positions[:, 2].min() + 0.1, 1, 0))
    ads = molecule(adsorbate) if len(adsorbate) > 1 else Atoms(adsorbate)
    add_adsorbate(slab, ads, height=1.8, position="ontop")
    tags = slab.get_tags()
    tags[tags == 0] = 0
    slab.set_tags(np.concatenate([tags[: len(tags) - len(ads)], np.full(len(ads), 2)]))
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    slab.rattle(0.05, seed=seed)
    slab.pbc = True
    return slab


def molecule_in_box(name: str = "CH3CH2OH", box: float = 40.0) -> Atoms:
    mol = molecule(name)
    mol.cell = np.eye(3) * box
    mol.center()
    mol.pbc = True
    return mol


def to_batch(structures: list[Atoms], dtype=torch.float32):
    converter = AtomsToGraphs(r_edges=False, r_pbc=True)
    data = []
    for i, atoms in enumerate(structures):
        d = converter.convert(atoms)
        d.sid = i
        d.pos = d.pos.to(dtype)
        d.cell = d.cell.to(dtype)
        data.append(d)
    return data_list_collater(data)


@pytest.fixture(scope="session")
def slab_structures() -> list[Atoms]:
    return [
        slab_with_adsorbate("Cu", "111", "O", seed=0),
        slab_with_adsorbate("Pt", "100", "CO", seed=1),
        slab_with_adsorbate("Ag", "111", "OH", seed=2),
    ]


@pytest.fixture(scope="session")
def slab_batch(slab_structures):
    return to_batch(slab_structures)


@pytest.fixture(scope="session")
def molecule_batch():
    return to_batch([molecule_in_box("CH3CH2OH"), molecule_in_box("H2O")])


# a small EquiformerV3 (the official default activations and norm), for the tests
TINY_V3 = dict(
    use_pbc=True,
    otf_graph=True,
    max_neighbors=100,
    max_radius=5.0,
    max_num_elements=90,
    num_layers=2,
    num_channels=16,
    attn_hidden_channels=8,
    num_heads=2,
    attn_alpha_channels=4,
    attn_value_channels=4,
    ffn_hidden_channels=16,
    lmax=2,
    mmax=2,
    attn_grid_resolution_list=[8, 7],
    ffn_grid_resolution_list=[8, 8],
    edge_channels=8,
    num_radial_basis=16,
    attn_weights_drop=0.0,
    drop_path_rate=0.0,
)

TINY_V2 = dict(
    use_pbc=True,
    otf_graph=True,
    max_neighbors=100,
    max_radius=5.0,
    max_num_elements=90,
    num_layers=2,
    sphere_channels=16,
    attn_hidden_channels=16,
    num_heads=2,
    attn_alpha_channels=8,
    attn_value_channels=4,
    ffn_hidden_channels=16,
    norm_type="layer_norm_sh",
    lmax_list=[2],
    mmax_list=[1],
    grid_resolution=8,
    edge_channels=16,
    use_grid_mlp=True,
    alpha_drop=0.0,
    drop_path_rate=0.0,
    proj_drop=0.0,
)


@pytest.fixture
def tiny_v2_config() -> dict:
    return dict(TINY_V2)


@pytest.fixture(scope="session")
def ethanol_md() -> tuple[list[Atoms], list[Atoms]]:
    """GFN2-xTB ethanol at 500 K (tblite; ~8 s): 96 frames 2.5 fs apart, each carrying its energy
    (eV) and forces (eV/A); MD17 style: 64 random frames to train, the other 32 to test. Shared
    by the molecular learning tests of every model family."""
    frames = md_frames("ethanol", 96, seed=0, stride=5)
    order = np.random.default_rng(0).permutation(len(frames))
    return [frames[i] for i in order[:64]], [frames[i] for i in order[64:]]


@pytest.fixture(scope="session")
def emt_database(tmp_path_factory) -> Path:
    """Eight EMT-labelled 13-atom slabs (2x2x3 + one adsorbate atom) in an ASE database (energy,
    forces, stress)."""
    path = tmp_path_factory.mktemp("data") / "slabs.db"
    with connect(path) as db:
        for i in range(8):
            atoms = slab_with_adsorbate(["Cu", "Pt", "Ag", "Pd"][i % 4], "111", ["O", "N"][i % 2], seed=i)
            atoms.calc = EMT()
            atoms.get_potential_energy()
            atoms.get_stress()  # for configs that train a stress
            db.write(atoms)
    return path


def cli_config(database: Path, model: dict, **optim) -> dict:
    """A fairchem S2EF config training ``model`` on the ASE ``database`` (train and val)."""
    dataset = {"format": "ase_db", "src": str(database), "a2g_args": {"r_energy": True, "r_forces": True}}
    return s2ef_config({"train": dataset, "val": dataset}, model, **optim)


def s2ef_config(dataset: dict, model: dict, **optim) -> dict:
    """A fairchem S2EF config (stock ``forces`` trainer) for a ``dataset`` section."""
    forces = {"irrep_dim": 1, "level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True}
    base_optim = {"batch_size": 2, "eval_batch_size": 4, "num_workers": 0, "lr_initial": 1e-3}
    base_optim |= {"optimizer": "AdamW", "max_epochs": 1, "eval_every": 2, "scheduler": "Null"}
    return {
        "trainer": "forces",
        "logger": {"name": "tensorboard"},
        "dataset": dataset,
        "outputs": {"energy": {"shape": 1, "level": "system"}, "forces": forces},
        "loss_functions": [
            {"energy": {"fn": "mae", "coefficient": 1}},
            {"forces": {"fn": "l2mae", "coefficient": 10}},
        ],
        "evaluation_metrics": {
            "metrics": {"energy": ["mae"], "forces": ["mae"]},
            "primary_metric": "forces_mae",
        },
        "optim": base_optim | optim,
        "model": model,
    }


@pytest.fixture(scope="session")
def qm9_dataset(tmp_path_factory) -> Path:
    """A 24-conformer QM9-style GFN2-xTB dataset (``fairchem-equiformers-data qm9``), seed 0."""
    from fairchem_equiformers.data.qm9 import build_qm9_dataset

    out = tmp_path_factory.mktemp("qm9") / "qm9"
    build_qm9_dataset(out, num_conformers=24, seed=0)
    return out


@pytest.fixture(scope="session")
def emt_is2re_dataset(tmp_path_factory) -> Path:
    """The plugin's EMT dataset for eight systems (~20 s): ``is2re/{train,val,test}`` hold 6/1/1
    relaxations (``pos``, ``pos_relaxed``, ``fixed``, ``tags``, ``y_relaxed``)."""
    from fairchem_equiformers.data import build_emt_dataset

    out = tmp_path_factory.mktemp("emt_is2re") / "emt"
    build_emt_dataset(out, seed=0, num_systems=8, workers=1, progress=False)
    return out
