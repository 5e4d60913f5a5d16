"""Every model family learns real DFT data through the user's path: ``convert`` (separate test
file, isolated-atom references) then the plugin's trainer built by fairchem's own launcher code,
evaluated by fairchem's evaluator on held-out frames against the mean predictor.

Data (vendored in tests/data/real, see scripts/vendor_real_data.py): BOTNet acetylacetone (ORCA
PBE-D3, 100 training frames of the 300 K set, 50 frames of the 300 K test set) and mlearn silicon
(VASP PBE, periodic, 54 training and 25 test structures of 2-64 atoms, with stress).
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml

from fairchem_equiformers.data import convert_user_data

from .conftest import TINY_V2, TINY_V3, s2ef_config
from .test_training import make_trainer

REAL = Path(__file__).parent / "data" / "real"
COMMON = {"use_pbc": True, "otf_graph": True, "max_radius": 5.0, "max_num_elements": 20}
V2 = {**TINY_V2, **COMMON, "direct_forces": False, "max_neighbors": 50, "num_distance_basis": 64}
V1 = {
    **COMMON,
    "max_neighbors": 50,
    "direct_forces": False,
    "num_layers": 2,
    "irreps_node_embedding": "16x0e+8x1e",
    "irreps_head": "8x0e+4x1e",
    "num_heads": 2,
    "irreps_mlp_mid": "32x0e+16x1e",
    "irreps_feature": "32x0e",
    "num_radial_basis": 32,
    "radial_hidden_channels": [32],
}
E2FORMER = {
    **COMMON,
    "max_neighbors": 50,
    "irreps_node_embedding": "16x0e+16x1e+16x2e",
    "num_layers": 2,
    "num_heads": 2,
    "attn_alpha_channels": 8,
    "ffn_hidden_channels": 16,
    "num_distance_basis": 32,
    "edge_channels": 32,
}
DEQ_V2 = {k: v for k, v in V2.items() if k not in ("alpha_drop", "drop_path_rate", "proj_drop", "num_layers")}
# the S2-grid map of EquiformerV2 (DEQEquiformerV2 defaults to gate activations: exactly equivariant,
# but on this test they reach a force ratio of 0.52 where the S2 grids reach 0.38, 2026-12-05)
DEQ_V2["use_gate_act"] = False
V3 = {**TINY_V3, **COMMON, "direct_prediction": False, "max_neighbors": 50, "num_radial_basis": 64}
FAMILIES = {
    "EquiformerV2": V2,
    "EquiformerV3": V3,
    "EquiformerV1": V1,
    "E2Former": E2FORMER,
    "DEQEquiformerV2": {**DEQ_V2, "num_layers": 1},
}
# Epochs and learning rate per family (V1 learns more slowly per step at this size).
SCHEDULE = {
    "EquiformerV2": (8, 5e-3),
    "EquiformerV3": (8, 5e-3),
    "EquiformerV1": (16, 1e-2),
    "E2Former": (8, 5e-3),
    "DEQEquiformerV2": (8, 5e-3),
}


def energies_and_forces(path: Path) -> tuple[np.ndarray, np.ndarray]:
    frames = ase.io.read(path, ":")
    return np.array([a.get_potential_energy() for a in frames]), np.concatenate(
        [a.get_forces() for a in frames]
    )


def mean_predictor(train: Path, test: Path) -> dict[str, float]:
    """Test MAEs of predicting the training mean energy (per atom for variable sizes) and zero forces."""
    train_energy, _ = energies_and_forces(train)
    test_energy, test_forces = energies_and_forces(test)
    sizes = [len(a) for a in ase.io.read(test, ":")]
    train_sizes = [len(a) for a in ase.io.read(train, ":")]
    per_atom = np.mean(train_energy / train_sizes)
    return {
        "energy_mae": float(np.mean(np.abs(test_energy - per_atom * np.array(sizes)))),
        "forces_mae": float(np.mean(np.abs(test_forces))),
    }


@pytest.fixture(scope="module")
def acac(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "acac"
    test, isolated_atoms = [REAL / "acac_test.xyz"], REAL / "acac_isolated_atoms.xyz"
    convert_user_data(REAL / "acac_train.xyz", out, test_inputs=test, split_by="frame", val_fraction=0,
                      isolated_atoms=isolated_atoms, progress=False)  # fmt: skip
    return out


def train_and_test(dataset: Path, name: str, model: dict, tmp_path: Path, epochs: int, stress: float = 0,
                   batch_size: int = 8, lr: float = 5e-3, **optim_keys) -> dict[str, float]:  # fmt: skip
    """Train ``model`` with the plugin's trainer on ``dataset``'s train split; test-split metrics."""
    section = yaml.safe_load((dataset / "dataset.yml").read_text())["dataset"]
    section["val"] = section.pop("test")
    optim = {
        "batch_size": batch_size,
        "lr_initial": lr,
        "max_epochs": epochs,
        "eval_every": 10**6,
        "scheduler": "LambdaLR",
        "scheduler_params": {"lambda_type": "cosine", "warmup_epochs": 0.5, "warmup_factor": 0.2,
                             "lr_min_factor": 0.01},
        "optimizer_params": {"weight_decay": 0.0},
        **optim_keys,
    }  # fmt: skip
    config = s2ef_config(section, {"name": f"fairchem_equiformers.{name}", **model}, **optim)
    config["trainer"] = "fairchem_equiformers.ForcesTrainer"
    config["loss_functions"] = [{"energy": {"fn": "mae", "coefficient": 1}},
                                {"forces": {"fn": "l2mae", "coefficient": 10}}]  # fmt: skip
    metrics = {"energy": ["mae"], "forces": ["mae"]}
    if stress:
        config["outputs"]["stress"] = {"shape": 9, "level": "system"}
        config["loss_functions"].append({"stress": {"fn": "mae", "coefficient": stress}})
        metrics["stress"] = ["mae"]
    config["evaluation_metrics"]["metrics"] = metrics
    with make_trainer(tmp_path, config, name) as trainer:
        trainer.train()
        result = trainer.validate(split="val", disable_tqdm=True)
    return {key: float(value["metric"]) for key, value in result.items()}


# Held-out acetylacetone: test MAE / mean predictor's (energy 0.116 eV, forces 0.776 eV/A), measured
# (forces, energy): V2 0.285, 0.479; V3 0.413, 0.611; V1 0.246, 0.811; E2Former 0.447, 0.557;
# DEQ-V2 0.366, 0.528 (implicit training gradient, 2026-12-06).
REQUIRED = {
    "EquiformerV2": (0.35, 0.6),
    "EquiformerV3": (0.5, 0.75),
    "EquiformerV1": (0.3, 0.95),
    "E2Former": (0.55, 0.7),
    "DEQEquiformerV2": (0.45, 0.7),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_learns_real_molecular_dft_data(name, acac, tmp_path):
    baseline = mean_predictor(REAL / "acac_train.xyz", REAL / "acac_test.xyz")
    epochs, lr = SCHEDULE[name]
    metrics = train_and_test(acac, name, FAMILIES[name], tmp_path, epochs=epochs, lr=lr)
    ratios = {key: metrics[key] / baseline[key] for key in baseline}
    print(f"{name}: test {metrics}; mean predictor {baseline}; ratios {ratios}")
    force_ratio, energy_ratio = REQUIRED[name]
    assert ratios["forces_mae"] < force_ratio
    assert ratios["energy_mae"] < energy_ratio


def test_equiformer_v2_learns_periodic_dft_data_with_stress(tmp_path):
    """mlearn silicon (VASP PBE): energy, forces and stress (gradient forces and stress)."""
    out = tmp_path / "si"
    convert_user_data(REAL / "si_train.xyz", out, test_inputs=[REAL / "si_test.xyz"], split_by="info:group",
                      val_fraction=0, test_fraction=0, progress=False)  # fmt: skip
    baseline = mean_predictor(REAL / "si_train.xyz", REAL / "si_test.xyz")
    stresses = np.stack([a.get_stress(voigt=False) for a in ase.io.read(REAL / "si_test.xyz", ":")])
    baseline["stress_mae"] = float(np.mean(np.abs(stresses - stresses.mean(0))))
    model = {**V2, "regress_stress": True}
    metrics = train_and_test(
        out, "EquiformerV2", model, tmp_path, epochs=8, stress=100, batch_size=4, lr=1e-2
    )
    ratios = {key: metrics[key] / baseline[key] for key in baseline}
    print(f"Si: {metrics}; mean predictor {baseline}; ratios {ratios}")
    # The stress loss coefficient is 100 (eV/A^3 MAE): at 10, stress was 1% of the loss and whether the
    # 8 epochs learned it depended on the summation order (ratio 0.72 on one thread, 1.00 on two).
    # Measured 2026-12-06 (mean predictor: energy 18.2 eV, forces 0.566 eV/A, stress 8.3 meV/A^3),
    # seeds 0-3 on two threads and seed 0 on one: energy 0.075-0.168, forces 0.646-0.679,
    # stress 0.419-0.550.
    assert ratios["energy_mae"] < 0.25 and ratios["forces_mae"] < 0.75 and ratios["stress_mae"] < 0.7


def test_gradient_models_refuse_two_normalizer_scales(acac, tmp_path):
    """Energy and forces normalized by different numbers would make the returned forces
    rmsd_F / rmsd_E times the returned energy's gradient: the trainer refuses, naming both."""
    import shutil

    import torch
    from fairchem.core.modules.normalization.normalizer import Normalizer

    two = tmp_path / "two_scales"
    shutil.copytree(acac, two)
    normalizers = torch.load(two / "normalizers.pt", weights_only=False)
    normalizers["energy"] = Normalizer(mean=float(normalizers["energy"].mean), rmsd=0.1)
    torch.save(normalizers, two / "normalizers.pt")
    (two / "dataset.yml").write_text((two / "dataset.yml").read_text().replace(str(acac), str(two)))
    with pytest.raises(
        ValueError, match=r"need one normalizer scale \(rmsd\), got energy 0\.1, forces 1\.798"
    ):
        train_and_test(two, "EquiformerV2", V2, tmp_path, epochs=1)
    direct = {**V2, "direct_forces": True}  # direct forces are not a gradient: any scales train
    assert train_and_test(two, "EquiformerV2", direct, tmp_path / "direct", epochs=1)["forces_mae"] > 0
