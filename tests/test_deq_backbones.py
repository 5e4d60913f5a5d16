"""One ``DEQ`` class over every family: ``backbone:`` names the wrapped model (V1, V2, E2Former);
the fixed point converges, inference forces are the gradient of the returned energy, the
result is rotation-invariant as the family allows, and the flat-keyed ``DEQEquiformerV2`` /
``DEQEquiformerV1`` are exactly ``DEQ`` over their family (same weights, same outputs, and their
earlier flat state-dict layout loads)."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from fairchem_equiformers import DEQ, DEQEquiformerV1, DEQEquiformerV2

from .conftest import slab_with_adsorbate, to_batch
from .test_deq import TINY_DEQ
from .test_deq_v1 import TINY_DEQ_V1
from .test_e2former import TINY as TINY_E2FORMER

# the wrapped model's section for each family (gradient forces; dropouts are refused in a DEQ)
SECTIONS = {
    "EquiformerV2": {
        "model": "fairchem_equiformers.EquiformerV2",
        **TINY_DEQ,
        "direct_forces": False,
        "use_gate_act": True,
        "use_grid_mlp": False,  # no S2 grid: exactly equivariant
    },  # fmt: skip
    "EquiformerV1": {
        "model": "fairchem_equiformers.EquiformerV1",
        **TINY_DEQ_V1,
        "num_layers": 2,
        "max_num_elements": 90,
    },  # fmt: skip
    "E2Former": {"model": "fairchem_equiformers.E2Former", **TINY_E2FORMER, "num_layers": 1},
}
# measured float64 (tiny models, Cu(111)+O slab, defaults: precise solve and IFT at inference):
# force error against central differences (h = 1e-4 A), relative to the largest force, and the
# rotation error of energy and forces (all three exactly equivariant here: gate activations)
FD_TOLERANCE = 1e-7  # measured 3.3e-8 (V2), 8.3e-9 (E2Former), 3.7e-9 (V1)
# the solve stops at 1e-10 relative, but the rotated solve repeats the iterates to round-off:
# measured 7.8e-15 (V2), 7.1e-15 (E2Former), 2.3e-15 (V1)
ROTATION_TOLERANCE = 1e-12


def deq(family: str) -> DEQ:
    torch.manual_seed(0)
    model = DEQ(backbone=SECTIONS[family]).double().eval()
    with torch.no_grad():  # move away from the symmetric initial norms and biases
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def slab():
    return to_batch([slab_with_adsorbate("Cu", "111", "O", seed=3)], torch.float64)


@pytest.mark.parametrize("family", sorted(SECTIONS))
def test_deq_over_every_family_gives_the_gradient_of_its_energy(family, slab):
    model = deq(family)
    out = model(slab.clone())
    stats = model.deq_stats
    assert stats["converged_fraction"] == 1.0 and stats["rel_residual"] <= 1e-10
    errors, h = [], 1e-4
    for atom, axis in [(0, 0), (5, 1), (12, 2)]:
        plus, minus = slab.clone(), slab.clone()
        plus.pos[atom, axis] += h
        minus.pos[atom, axis] -= h
        difference = -(model(plus)["energy"] - model(minus)["energy"]) / (2 * h)
        errors.append(float((difference - out["forces"][atom, axis]).abs() / out["forces"].abs().max()))
    torch.manual_seed(1)
    rotation = o3.rand_matrix(dtype=torch.float64)
    rotated = slab.clone()
    rotated.pos, rotated.cell = slab.pos @ rotation.T, slab.cell @ rotation.T
    turned = model(rotated)
    energy_error = float((turned["energy"] - out["energy"]).abs().max() / out["energy"].abs().max())
    force_error = float(
        (turned["forces"] - out["forces"] @ rotation.T).abs().max() / out["forces"].abs().max()
    )
    print(f"{family}: {stats['iterations']:.0f} iterations, FD error {max(errors):.1e}, "
          f"rotation error energy {energy_error:.1e}, forces {force_error:.1e}")  # fmt: skip
    # measured 2026-12-06: 3.3e-8 (V2), 8.3e-9 (E2Former), 3.7e-9 (V1)
    assert max(errors) < FD_TOLERANCE
    # measured 2026-12-06: 7.8e-15 (V2), 7.1e-15 (E2Former), 2.3e-15 (V1)
    assert max(energy_error, force_error) < ROTATION_TOLERANCE


@pytest.mark.parametrize(
    "legacy, family, layout",
    [
        (DEQEquiformerV2, "EquiformerV2", lambda key, k: key),
        (DEQEquiformerV1, "EquiformerV1", lambda key, k: key.replace(f"blocks.{k}.", "output_block.")),
    ],
)
def test_flat_keyed_deq_models_are_deq_over_their_family(legacy, family, layout, slab):
    section = {k: v for k, v in SECTIONS[family].items() if k != "model"}
    num_layers = section.pop("num_layers") - (family == "EquiformerV1")  # V1: the output block is extra
    torch.manual_seed(0)
    flat = legacy(num_layers=num_layers, **section).double().eval()
    torch.manual_seed(0)
    general = DEQ(backbone=SECTIONS[family]).double().eval()
    assert flat.state_dict().keys() == general.state_dict().keys()
    general.load_state_dict(flat.state_dict())
    for a, b in zip(flat(slab.clone()).values(), general(slab.clone()).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the flat layout these models saved before (wrapped model's keys at the top level)
    earlier = {
        layout(key.removeprefix("backbone."), num_layers): value for key, value in flat.state_dict().items()
    }
    assert not any(key.startswith("backbone.") for key in earlier)
    restored = legacy(num_layers=num_layers, **section).double().eval()
    restored.load_state_dict(earlier, strict=True)
    for a, b in zip(flat(slab.clone()).values(), restored(slab.clone()).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_backbone_section_with_dropout_or_without_a_model_is_an_error():
    with pytest.raises(ValueError, match="drop_path_rate must be 0 in DEQ: dropout"):
        DEQ(backbone={**SECTIONS["E2Former"], "drop_path_rate": 0.1})
    with pytest.raises(ValueError, match="must be a section naming the wrapped model"):
        DEQ(backbone={k: v for k, v in SECTIONS["E2Former"].items() if k != "model"})
