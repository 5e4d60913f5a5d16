"""Backbones and heads compose with fairchem's stock ``hydra`` model: the same function as the
registered composite models, and the fine-tuning path (start from a checkpoint, new heads,
frozen backbone) through the plugin's trainer."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry

import fairchem_equiformers  # noqa: F401  (registers the models)
from fairchem_equiformers import DEQEquiformerV2, EquiformerV2

from .conftest import TINY_V2, cli_config, to_batch
from .test_deq import TINY_DEQ
from .test_training import make_trainer

BACKBONE = "fairchem_equiformers.EquiformerV2Backbone"
DIRECT_HEADS = {
    "energy": {"module": "fairchem_equiformers.EquiformerV2EnergyHead"},
    "forces": {"module": "fairchem_equiformers.EquiformerV2ForceHead"},
}
GRADIENT_HEADS = {"energy_forces_stress": {"module": "fairchem_equiformers.GradientHead"}}


def hydra(backbone: dict, heads: dict, **keys) -> torch.nn.Module:
    return registry.get_model_class("hydra")(
        backbone=backbone, heads=heads, pass_through_head_outputs=True, **keys
    )


def hydra_state(composite_state: dict, heads: dict[str, str], prefix: str = "backbone.") -> dict:
    """A composite model's state dict in the hydra layout: ``heads`` maps a composite head's
    name (``energy_block``) to its place in the hydra model (``output_heads.energy``)."""
    state = {}
    for key, value in composite_state.items():
        head = key.split(".")[0]
        state[f"{heads[head]}{key[len(head) :]}" if head in heads else prefix + key] = value
    return state


def same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_hydra_with_the_direct_heads_is_the_released_model(slab_structures):
    config = {**TINY_V2, "num_layers": 1}
    torch.manual_seed(0)
    composite = EquiformerV2(**config).double().eval()
    model = hydra({"model": BACKBONE, **config}, DIRECT_HEADS).double().eval()
    heads = {"energy_block": "output_heads.energy", "force_block": "output_heads.forces"}
    model.load_state_dict(hydra_state(composite.state_dict(), heads), strict=True)
    batch = to_batch(slab_structures, torch.float64)
    same_outputs(model(batch.clone()), composite(batch.clone()))


def test_hydra_with_the_gradient_head_is_the_conservative_model_with_stress(slab_structures):
    config = {**TINY_V2, "num_layers": 1, "direct_forces": False, "regress_stress": True}
    torch.manual_seed(0)
    composite = EquiformerV2(**config).double().eval()
    model = hydra({"model": BACKBONE, **config}, GRADIENT_HEADS).double().eval()
    heads = {"energy_block": "output_heads.energy_forces_stress.energy"}
    model.load_state_dict(hydra_state(composite.state_dict(), heads), strict=True)
    batch = to_batch(slab_structures, torch.float64)
    out = model(batch.clone())
    assert set(out) == {"energy", "forces", "stress"}
    same_outputs(out, composite(batch.clone()))


def test_deq_backbone_composes_with_the_family_heads(slab_structures):
    """A ``DEQBackbone`` takes the heads of the family it wraps, and equals ``DEQEquiformerV2``."""
    config = {**TINY_DEQ, "direct_forces": False}
    torch.manual_seed(0)
    composite = DEQEquiformerV2(**config).double().eval()
    backbone = {
        "model": "fairchem_equiformers.DEQBackbone",
        "backbone": {"model": BACKBONE, "num_layers": 2, **config},
    }
    model = hydra(backbone, GRADIENT_HEADS).double().eval()
    state = {k.replace("backbone.energy_block", "energy_block"): v for k, v in composite.state_dict().items()}
    model.load_state_dict(hydra_state(state, {"energy_block": "output_heads.energy_forces_stress.energy"}))
    batch = to_batch(slab_structures, torch.float64)
    same_outputs(model(batch.clone()), composite(batch.clone()))


def trainer_config(database, model: dict, **optim) -> dict:
    config = cli_config(database, model, **optim)
    config["trainer"] = "fairchem_equiformers.ForcesTrainer"
    return config


def test_fine_tune_a_trained_model_with_a_new_head_and_a_frozen_backbone(emt_database, tmp_path):
    """Train a hydra model; fine-tune it from its checkpoint (fairchem's ``finetune_config``) with
    a fresh force head and the backbone frozen: the backbone keeps the trained weights exactly,
    the new head learns."""
    backbone = {"model": BACKBONE, **TINY_V2, "num_layers": 1, "alpha_drop": 0.0, "drop_path_rate": 0.0}
    optim = {"max_epochs": 4, "lr_initial": 2e-3, "eval_every": 1000}
    base = trainer_config(emt_database, {"name": "hydra", "backbone": backbone, "heads": DIRECT_HEADS,
                                         "pass_through_head_outputs": True}, **optim)  # fmt: skip
    with make_trainer(tmp_path, base, "base") as trainer:
        trainer.train()
        trained = {k: v.clone() for k, v in trainer._unwrapped_model.state_dict().items()}
    checkpoint = next((tmp_path / "base").rglob("checkpoint.pt"))

    new_head = {"forces": {"module": "fairchem_equiformers.EquiformerV2ForceHead"}}
    fine_tune = {
        "name": "hydra",
        "finetune_config": {"starting_checkpoint": str(checkpoint)},
        "heads": {"energy": DIRECT_HEADS["energy"], **new_head},
        "freeze_backbone": True,
        "pass_through_head_outputs": True,
    }
    config = trainer_config(emt_database, fine_tune, **optim)
    with make_trainer(tmp_path, config, "fine_tune") as trainer:
        model = trainer._unwrapped_model
        start = {k: v.clone() for k, v in model.state_dict().items()}
        before = trainer.validate("val")["forces_mae"]["metric"]
        trainer.train()
        after = trainer.validate("val")["forces_mae"]["metric"]
        end = model.state_dict()
    backbone_keys = [k for k in trained if k.startswith("backbone.")]
    assert backbone_keys and all(torch.equal(end[k], trained[k]) for k in backbone_keys)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not torch.equal(start["output_heads.forces.proj.weight"], end["output_heads.forces.proj.weight"])
    print(f"fresh force head: val force MAE {before:.3f} -> {after:.3f} eV/A")
    assert after < 0.7 * before


def test_equiformer_v3_in_hydra_with_its_direct_heads_and_with_the_gradient_head(slab_structures):
    """EquiformerV3's backbone and heads compose in hydra exactly as the composite model: direct
    energy, forces and stress heads, and the shared gradient head (forces and stress)."""
    from fairchem_equiformers import EquiformerV3

    from .conftest import TINY_V3

    batch = to_batch(slab_structures, torch.float64)
    direct_heads = {
        "energy": {"module": "fairchem_equiformers.EquiformerV3EnergyHead"},
        "forces": {"module": "fairchem_equiformers.EquiformerV3ForceHead"},
        "stress": {"module": "fairchem_equiformers.EquiformerV3StressHead"},
    }
    for config, heads, places in [
        (
            {**TINY_V3, "num_layers": 1, "regress_stress": True},
            direct_heads,
            {"energy_block": "output_heads.energy", "force_block": "output_heads.forces",
             "stress_block": "output_heads.stress"},
        ),
        (
            {**TINY_V3, "num_layers": 1, "regress_stress": True, "direct_prediction": False},
            GRADIENT_HEADS,
            {"energy_block": "output_heads.energy_forces_stress.energy"},
        ),
    ]:  # fmt: skip
        torch.manual_seed(0)
        composite = EquiformerV3(**config).double().eval()
        model = hydra({"model": "fairchem_equiformers.EquiformerV3Backbone", **config}, heads).double().eval()
        model.load_state_dict(hydra_state(composite.state_dict(), places), strict=True)
        out = model(batch.clone())
        assert set(out) == {"energy", "forces", "stress"}
        same_outputs(out, composite(batch.clone()))
