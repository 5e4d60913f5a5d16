"""Loading released weights: flat layout with module. prefixes, fairchem's backbone+heads
layout, fairchem's own loading path, and the errors for checkpoints that do not fit."""

from __future__ import annotations

import copy

import fairchem.core.models.equiformer_v2.equiformer_v2  # noqa: F401  (registers the backbone and heads)
import pytest
import torch
from fairchem.core.common.utils import load_state_dict as fairchem_load_state_dict
from fairchem.core.common.utils import match_state_dict
from fairchem.core.models.base import HydraModel
from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as Reference
from torch import nn

from fairchem_equiformers import EquiformerV2

from .test_equiformer_v2_parity import (
    BASE,
    CONFIGS,
    ENERGY_TOLERANCE,
    FORCE_TOLERANCE,
    build_pair,
    relative_error,
)

CONFIG = {**BASE, **CONFIGS["L4M3_3layers_gate_ln_linref"]}


def outputs(model, batch):
    model.eval()
    return model(copy.deepcopy(batch))


def test_released_flat_layout_with_module_prefixes(slab_batch):
    reference, ours = build_pair(CONFIG)
    released = {"module.module." + k: v for k, v in reference.state_dict().items()}
    assert sum(".SO3_grid." in k for k in released) > 100  # the duplicated buffers are there
    fresh = EquiformerV2(**CONFIG)
    fresh.load_state_dict(released)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(outputs(fresh, slab_batch)["forces"], outputs(ours, slab_batch)["forces"])


def test_every_parameter_is_matched():
    reference, ours = build_pair(CONFIG)
    reference_params = {k for k, _ in reference.named_parameters()}
    assert reference_params == set(ours.state_dict().keys())
    assert sum(p.numel() for p in reference.parameters()) == ours.num_params


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: adds one ``module.`` prefix."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model


@pytest.mark.parametrize("wrapped", [False, True])
def test_fairchem_checkpoint_path(wrapped, slab_batch):
    """What fairchem's trainer does with --checkpoint: match module. prefixes, strict load."""
    reference, ours = build_pair(CONFIG)
    released = {"module.module." + k: v for k, v in reference.state_dict().items()}
    fresh = EquiformerV2(**CONFIG)
    target = Wrapper(fresh) if wrapped else fresh
    fairchem_load_state_dict(target, match_state_dict(target.state_dict(), released), strict=True)
    torch.testing.assert_close(outputs(fresh, slab_batch)["energy"], outputs(ours, slab_batch)["energy"])


def test_backbone_and_heads_layout(slab_batch):
    config = {k: v for k, v in CONFIG.items() if k != "use_energy_lin_ref"}
    torch.manual_seed(0)
    hydra = HydraModel(
        backbone={"model": "equiformer_v2_backbone", **config},
        heads={
            "energy": {"module": "equiformer_v2_energy_head"},
            "forces": {"module": "equiformer_v2_force_head"},
        },
    )
    with torch.no_grad():
        for p in hydra.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {"module." + k: v for k, v in hydra.state_dict().items()}
    assert any(k.startswith("module.output_heads.energy.energy_block.") for k in state)
    ours = EquiformerV2(**config)
    ours.load_state_dict(state)
    hydra.eval()
    torch.manual_seed(0)
    heads = hydra(copy.deepcopy(slab_batch))
    expected = {"energy": heads["energy"]["energy"], "forces": heads["forces"]["forces"]}
    got = outputs(ours, slab_batch)
    assert relative_error(got["energy"], expected["energy"]) < ENERGY_TOLERANCE
    assert relative_error(got["forces"], expected["forces"]) < FORCE_TOLERANCE


def test_unknown_key_is_an_error_naming_it():
    reference, _ = build_pair(CONFIG)
    state = reference.state_dict()
    state["blocks.7.ga.proj.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"blocks\.7\.ga\.proj\.weight"):
        EquiformerV2(**CONFIG).load_state_dict(state)


def test_missing_key_is_an_error_naming_it():
    reference, _ = build_pair(CONFIG)
    state = reference.state_dict()
    del state["blocks.1.ffn.so3_linear_2.weight"]
    with pytest.raises(RuntimeError, match=r"blocks\.1\.ffn\.so3_linear_2\.weight"):
        EquiformerV2(**CONFIG).load_state_dict(state)
    model = EquiformerV2(**CONFIG)
    with pytest.raises(RuntimeError, match=r"so3_linear_2"):
        fairchem_load_state_dict(model, match_state_dict(model.state_dict(), state), strict=True)


def test_checkpoint_with_other_distance_basis_names_the_fix():
    reference, _ = build_pair(CONFIG)
    with pytest.raises(ValueError, match="num_distance_basis: 600"):
        EquiformerV2(**CONFIG, num_distance_basis=512).load_state_dict(reference.state_dict())


def test_checkpoint_with_other_grid_names_the_fix():
    reference = Reference(**{**CONFIG, "grid_resolution": 16})
    with pytest.raises(ValueError, match="grid_resolution"):
        EquiformerV2(**CONFIG).load_state_dict(reference.state_dict())


RELEASED = dict(
    max_neighbors=20, max_radius=12.0, max_num_elements=90, sphere_channels=128,
    attn_hidden_channels=64, num_heads=8, attn_alpha_channels=64, attn_value_channels=16,
    ffn_hidden_channels=128, norm_type="layer_norm_sh", grid_resolution=18, edge_channels=128,
    use_grid_mlp=True, use_sep_s2_act=True, use_attn_renorm=True, alpha_drop=0.1,
)  # fmt: skip


@pytest.mark.parametrize(
    "layers,lmax,mmax,lin_ref,expected",
    [
        (12, 6, 2, False, 83_164_802),  # eq2_83M_2M.pt
        (8, 4, 2, False, 31_058_690),  # eq2_31M_ec4_allmd.pt
        (20, 6, 3, False, 153_602_690),  # eq2_153M_ec4_allmd.pt
        (18, 6, 2, True, 121_526_492),  # eq2_121M_e4_f100_oc22_s2ef.pt
    ],
)
def test_parameter_counts_match_released_models(layers, lmax, mmax, lin_ref, expected):
    model = EquiformerV2(
        **RELEASED, num_layers=layers, lmax_list=[lmax], mmax_list=[mmax], load_energy_lin_ref=lin_ref
    )
    assert model.num_params == expected
