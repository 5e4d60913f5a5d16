"""DeNS (denoising non-equilibrium structures): EquiformerV3DeNS against the official
``equiformer_v3_dens`` (same weights, loaded strictly; ordinary, fully and partly corrupted
batches; direct and gradient; train and eval), its symmetry in float64, the trainer's corruption
and loss against the official trainer's functions (same seed, same numbers), and DeNS training
end to end through fairchem's launcher on real DFT data."""

from __future__ import annotations

import logging
import os
import types

import pytest
import torch
import yaml
from fairchem.core.modules.loss import DDPLoss
from fairchem.core.modules.normalization.normalizer import Normalizer
from scipy.spatial.transform import Rotation

from fairchem_equiformers import EquiformerV3, EquiformerV3DeNS
from fairchem_equiformers.training import denoising

from .conftest import s2ef_config
from .test_model_battery import ROUND_OFF, V3_GATE
from .test_real_data import REAL, V3, acac, mean_predictor  # noqa: F401  (acac: a fixture)
from .test_training import make_trainer

try:
    from equiformer_v3.experimental.trainers import equiformer_v3_dens_trainer as official_trainer

    from .test_equiformer_v3_parity import CONFIGS, PARITY, batch, fixed_frame_vectors
    from .test_equiformer_v3_parity import twins as parity_twins
except ImportError:  # the oracle is installed by scripts/test.sh; CI must have it
    if os.environ.get("CI"):
        raise
    pytest.skip("the official equiformer-v3 (test oracle) is not installed", allow_module_level=True)

MODEL_CONFIGS = [
    "attn=sep-merge_gates2_swiglu,norm=merge_layer_norm_attn_rms_norm",
    "attn=sep_s2_swiglu,norm=merge_rms_norm",
    "per-order-radial,s2-force-head",
]


def dens_batch(kind: str, mode: str, dtype=torch.float32):
    """A batch of ``kind`` with random input forces: ``plain`` (ordinary), ``all`` (every atom
    noisy) or ``partial`` (a noise mask, and one structure outside the DeNS structures)."""
    data = batch(kind)
    generator = torch.Generator().manual_seed(1)
    data.forces = torch.randn(len(data.pos), 3, generator=generator)
    if mode != "plain":
        data.denoising_pos_forward = True
    if mode == "partial":
        data.noise_mask = torch.rand(len(data.pos), generator=generator) < 0.5
        data.dens_batch_mask = torch.tensor([False] + [True] * (len(data.natoms) - 1))
    for key in ("pos", "cell", "forces"):
        data[key] = data[key].to(dtype)
    return data


def twins(config: dict):
    return parity_twins(config, "equiformer_v3_dens", EquiformerV3DeNS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "gradient"])
def test_dens_model_equals_the_official(name, direct):
    official, ours = twins(dict(CONFIGS[name], direct_prediction=direct, regress_stress=True))
    worst = 0.0
    for train in (False, True):
        official.train(train)
        ours.train(train)
        for mode in ("plain", "all", "partial"):
            with fixed_frame_vectors():
                expected, actual = official(dens_batch("bulk", mode)), ours(dens_batch("bulk", mode))
            assert set(actual) == {"energy", "forces", "stress"} == set(expected)
            for key in expected:
                if mode == "all" and key == "stress":  # no stress for denoised structures
                    assert not actual[key].any() and not expected[key].any()
                    continue
                error = float((actual[key] - expected[key]).abs().max() / expected[key].abs().max())
                worst = max(worst, error)
    print(f"\nMEASURED {name} {'direct' if direct else 'gradient'}: {worst:.2e}")
    assert worst < PARITY  # measured 2026-12-06: up to 9.6e-6 (gradient, train), 2.0e-6 direct


def test_an_ordinary_batch_gives_the_plain_model_outputs():
    """Outside DeNS the force encoding is exactly zero and the denoising head is not used."""
    config = dict(CONFIGS[MODEL_CONFIGS[0]], regress_stress=True)
    torch.manual_seed(0)
    dens = EquiformerV3DeNS(**config).eval()
    plain = EquiformerV3(**config).eval()
    state = {
        k: v for k, v in dens.state_dict().items() if not k.startswith(("force_embedding.", "dens_block."))
    }
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        a, b = dens(dens_batch("bulk", "plain")), plain(dens_batch("bulk", "plain"))
    for key in b:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "gradient"])
def test_dens_outputs_rotate_with_the_structure_and_its_forces_in_float64(direct):
    config = dict(V3_GATE, direct_prediction=direct)  # gate activations: exactly equivariant
    torch.manual_seed(0)
    model = EquiformerV3DeNS(**config).double().eval()
    rotation = torch.tensor(Rotation.random(random_state=3).as_matrix())
    data = dens_batch("slab", "partial", torch.float64)
    turned = dens_batch("slab", "partial", torch.float64)
    for key in ("pos", "cell", "forces"):
        turned[key] = turned[key] @ rotation.T
    a, b = model(data), model(turned)
    data.forces = torch.zeros_like(data.forces)
    assert (model(data)["energy"] - a["energy"]).abs().min() > 1e-6  # the force input is seen
    energy = float((a["energy"] - b["energy"]).abs().max() / a["energy"].abs().max())
    forces = float((a["forces"] @ rotation.T - b["forces"]).abs().max() / a["forces"].abs().max())
    print(
        f"\nMEASURED float64 {'direct' if direct else 'gradient'}: energy {energy:.1e}, forces {forces:.1e}"
    )
    assert energy < ROUND_OFF and forces < ROUND_OFF


PARAMS = dict(prob=1.0, std=0.025, corrupt_ratio=0.5, strict_max_ratio=0.75, max_force_norm=2.5,
              max_mean_force_norm=3.0, min_num_atoms=2)  # fmt: skip


@pytest.mark.parametrize("all_atoms", [False, True])
def test_corruption_equals_the_official_with_the_same_seed(all_atoms):
    def labelled():
        data = batch("bulk")
        generator = torch.Generator().manual_seed(2)
        data.forces = 0.8 * torch.randn(len(data.pos), 3, generator=generator)
        data.forces[0] = torch.tensor([3.0, 0.0, 0.0])  # the first structure's largest force: skipped
        data.fixed = (torch.arange(len(data.pos)) % 3 == 0).float()
        return data

    torch.manual_seed(7)
    ours = denoising.corrupt(
        labelled(), denoising.DenoisingParams(coefficient=1.0, all_atoms=all_atoms, **PARAMS)
    )
    torch.manual_seed(7)
    official = official_trainer.add_gaussian_noise_to_position(
        labelled(), std=0.025, corrupt_ratio=0.5, all_atoms=all_atoms, min_num_atoms=2, strict_max_ratio=0.75,
        max_force_norm=2.5, max_mean_force_norm=3.0,
    )  # fmt: skip
    for key in ("pos", "noise_vec", "noise_mask", "dens_batch_mask"):
        assert torch.equal(ours[key], official[key]), key
    assert ours.denoising_pos_forward and not ours.dens_batch_mask[0] and ours.dens_batch_mask[1]
    moved = (ours.pos != batch("bulk").pos).any(-1)
    assert moved.any() and not (moved & ~ours.noise_mask).any()


@pytest.mark.parametrize("partial", [True, False], ids=["noise-mask", "all-noisy"])
@pytest.mark.parametrize("all_atoms", [False, True])
def test_dens_loss_equals_the_official(partial, all_atoms):
    data = batch("bulk")
    generator = torch.Generator().manual_seed(3)
    data.forces = torch.randn(len(data.pos), 3, generator=generator)
    data.energy = torch.randn(len(data.natoms), generator=generator)
    data.fixed = (torch.arange(len(data.pos)) % 4 == 0).float()
    torch.manual_seed(5)
    params = denoising.DenoisingParams(prob=1.0, std=0.05, coefficient=7.0, all_atoms=all_atoms,
                                       corrupt_ratio=0.5 if partial else None)  # fmt: skip
    data = denoising.corrupt(data, params)
    out = {"energy": torch.randn(len(data.natoms), generator=generator, requires_grad=True),
           "forces": torch.randn(len(data.pos), 3, generator=generator, requires_grad=True)}  # fmt: skip
    forces_loss = DDPLoss("l2mae", reduction="mean")
    normalizer = Normalizer(mean=0.0, rmsd=1.7)
    ours = denoising.denoising_force_loss(
        out["forces"], data, normalizer.norm(data.forces), force_coefficient=20.0, noise_coefficient=7.0,
        std=0.05, loss_fn=forces_loss, free_atoms_only=True, all_atoms=all_atoms,
    )  # fmt: skip
    official_params = official_trainer.DenoisingPosParams(
        prob=1.0, std=0.05, all_atoms=all_atoms, denoising_pos_coefficient=7.0,
        corrupt_ratio=0.5 if partial else None,
    )  # fmt: skip
    host = types.SimpleNamespace(
        loss_functions=[("forces", {"fn": forces_loss, "coefficient": 20.0})],
        output_targets={"forces": {"level": "atom", "train_on_free_atoms": True}},
        normalizers={"forces": normalizer, "denoising_pos_target": Normalizer(mean=0.0, rmsd=0.05)},
        elementrefs={}, denoising_pos_params=official_params,
        _compute_current_denoising_pos_coefficient=lambda: 7.0,
    )  # fmt: skip
    if all_atoms and not partial:  # the official mask [N, 1] cannot index the [N, 3] targets
        with pytest.raises(IndexError):
            official_trainer.EquiformerV3DeNSTrainer._compute_loss(host, out, data)
        expected = 7.0 * (out["forces"] - data.noise_vec / 0.05).norm(dim=-1).mean()  # every atom
    else:
        expected = official_trainer.EquiformerV3DeNSTrainer._compute_loss(host, out, data)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=0), (float(ours), float(expected))


def test_bad_dens_settings_are_errors_naming_the_key():
    base = {"use_denoising_pos": True, "denoising_pos_coefficient": 1.0}
    with pytest.raises(ValueError, match=r"unknown optim.denoising_pos_params key\(s\) \['stdd'\]"):
        denoising.DenoisingParams.from_optim({**base, "denoising_pos_params": {"prob": 0.5, "stdd": 0.1}})
    with pytest.raises(ValueError, match="fixed_noise_std: false"):
        denoising.DenoisingParams.from_optim(
            {**base, "denoising_pos_params": {"prob": 0.5, "std": 0.1, "fixed_noise_std": False}}
        )
    with pytest.raises(ValueError, match=r"denoising_pos_params.std"):
        denoising.DenoisingParams.from_optim({**base, "denoising_pos_params": {"prob": 0.5}})
    with pytest.raises(ValueError, match="needs optim.denoising_pos_coefficient"):
        denoising.DenoisingParams.from_optim(
            {"use_denoising_pos": True, "denoising_pos_params": {"prob": 1, "std": 1}}
        )
    official = {"prob": 0.5, "fixed_noise_std": True, "std": 0.025, "corrupt_ratio": 0.5, "num_steps": 50,
                "std_low": 0.01, "std_high": 0.5, "min_num_atoms": None, "strict_max_ratio": 0.75,
                "max_force_norm": 2.5}  # fmt: skip
    params = denoising.DenoisingParams.from_optim({**base, "denoising_pos_params": official})
    assert params.std == 0.025 and params.strict_max_ratio == 0.75
    assert denoising.DenoisingParams.from_optim({}) is None


def test_dens_training_through_the_launcher_learns_forces_and_the_noise(acac, tmp_path):  # noqa: F811
    """EquiformerV3DeNS (direct, the official DeNS recipe's mode) on held-out acetylacetone
    (ORCA DFT): trained with DeNS on half of the batches, its forces beat the mean predictor,
    and on corrupted test structures it predicts the noise better than zero does."""
    params = {"prob": 0.5, "std": 0.05, "corrupt_ratio": 0.5}
    section = yaml.safe_load((acac / "dataset.yml").read_text())["dataset"]
    section["val"] = section.pop("test")
    schedule = {"lambda_type": "cosine", "warmup_epochs": 0.5, "warmup_factor": 0.2, "lr_min_factor": 0.01}
    optim = {
        "batch_size": 8, "lr_initial": 5e-3, "max_epochs": 8, "eval_every": 10**6, "scheduler": "LambdaLR",
        "scheduler_params": schedule, "optimizer_params": {"weight_decay": 0.0},
        "use_denoising_pos": True, "denoising_pos_coefficient": 10.0, "denoising_pos_params": params,
    }  # fmt: skip
    model = {"name": "fairchem_equiformers.EquiformerV3DeNS", **V3, "direct_prediction": True}
    config = s2ef_config(section, model, **optim)
    config["trainer"] = "fairchem_equiformers.ForcesTrainer"
    config["loss_functions"] = [{"energy": {"fn": "mae", "coefficient": 1}},
                                {"forces": {"fn": "l2mae", "coefficient": 10}}]  # fmt: skip
    with make_trainer(tmp_path, config, "dens") as trainer:
        trainer.train()
        forces_mae = float(trainer.validate(split="val", disable_tqdm=True)["forces_mae"]["metric"])
        trainer.model.eval()
        torch.manual_seed(0)
        errors, noise = [], []
        settings = denoising.DenoisingParams(coefficient=10.0, **{**params, "prob": 1.0})
        with torch.no_grad():
            for data in trainer.val_loader:
                data = denoising.corrupt(data, settings)
                noisy = data.noise_mask
                predicted = trainer.model(data)["forces"][noisy] * settings.std
                errors.append((predicted - data.noise_vec[noisy]).abs().flatten())
                noise.append(data.noise_vec[noisy].abs().flatten())
    denoising_mae, zero_mae = float(torch.cat(errors).mean()), float(torch.cat(noise).mean())
    force_ratio = forces_mae / mean_predictor(REAL / "acac_train.xyz", REAL / "acac_test.xyz")["forces_mae"]
    print(
        f"\nMEASURED forces/mean predictor {force_ratio:.3f}, noise MAE {denoising_mae:.4f} A "
        f"(zero {zero_mae:.4f})"
    )
    # measured 2026-12-06: forces 0.499 (0.388 for the same model without DeNS: 8 epochs are too few
    # for the auxiliary task to pay), noise 0.0345 A against 0.0413 for predicting zero (0.84)
    assert force_ratio < 0.6
    assert denoising_mae < 0.9 * zero_mae


def test_dens_needs_a_dens_model(acac, tmp_path):  # noqa: F811
    section = yaml.safe_load((acac / "dataset.yml").read_text())["dataset"]
    optim = {
        "use_denoising_pos": True,
        "denoising_pos_coefficient": 1.0,
        "denoising_pos_params": {"prob": 0.5, "std": 0.1},
    }
    config = s2ef_config(section, {"name": "fairchem_equiformers.EquiformerV3", **V3}, **optim)
    config["trainer"] = "fairchem_equiformers.ForcesTrainer"
    with pytest.raises(ValueError, match="optim.use_denoising_pos needs a DeNS model .* got EquiformerV3"):
        with make_trainer(tmp_path, config, "plain"):
            pass


def test_a_dens_direct_checkpoint_starts_a_gradient_fine_tune(caplog):
    """The official recipe: the DeNS direct model's weights into a gradient EquiformerV3 (direct
    heads, force encoding and denoising head dropped with warnings); same energy on an ordinary
    batch, forces -dE/dpos."""
    config = dict(CONFIGS[MODEL_CONFIGS[0]], regress_stress=True)
    official, direct = twins(config)
    gradient = EquiformerV3(**dict(config, direct_prediction=False))
    with caplog.at_level(logging.WARNING):
        gradient.load_state_dict(official.state_dict(), strict=True)
    assert "direct heads" in caplog.text and "force encoding and denoising head" in caplog.text
    gradient._edge_rotation = direct._edge_rotation
    direct.eval()
    gradient.eval()
    with fixed_frame_vectors():
        a, b = direct(dens_batch("bulk", "plain")), gradient(dens_batch("bulk", "plain"))
    assert torch.allclose(a["energy"], b["energy"], rtol=1e-6, atol=0) and set(b) == {
        "energy",
        "forces",
        "stress",
    }
