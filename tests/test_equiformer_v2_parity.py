"""Parity with fairchem 1.10's EquiformerV2 on the same weights and inputs.

The reference draws each edge frame's spin about the edge at random. The SO(2) convolutions
are exactly invariant to it but the S2-grid activations are not, so the reference disagrees
with itself between calls: ~1e-6 relative on fine grids, ~1e-3 on the coarse default grid
(5 longitudes). Two checks therefore:

* same frame: our model fed the reference's random frame (same seed) must agree to 1e-5
  relative for every config -- the implementations compute the same function;
* our deterministic frame must agree to 1e-5 relative where the reference itself is stable
  (grid_resolution set, as in every released config).
"""

from __future__ import annotations

import copy

import pytest
import torch
from fairchem.core.models.equiformer_v2.edge_rot_mat import init_edge_rot_mat
from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as Reference

from fairchem_equiformers import EquiformerV2
from fairchem_equiformers.primitives import EdgeRotation, radius_graph_nonperiodic

# float32 relative errors against the reference (max over the tests below, measured 2026-12-06):
# energy 4.3e-7, forces 4.9e-6; the reference against itself with another random frame: forces 2.5e-6
ENERGY_TOLERANCE, FORCE_TOLERANCE = 1e-6, 1e-5

BASE = dict(
    use_pbc=True,
    otf_graph=True,
    max_neighbors=20,
    max_radius=12.0,
    max_num_elements=90,
    sphere_channels=32,
    attn_hidden_channels=16,
    num_heads=4,
    attn_alpha_channels=8,
    attn_value_channels=8,
    ffn_hidden_channels=32,
    edge_channels=32,
    alpha_drop=0.0,
    drop_path_rate=0.0,
    proj_drop=0.0,
)

CONFIGS = {
    "L2M1_1layer_gridmlp_lnsh": dict(num_layers=1, lmax_list=[2], mmax_list=[1], use_grid_mlp=True,
                                     norm_type="layer_norm_sh", grid_resolution=10),
    "L3M2_2layers_seps2_rms_norenorm": dict(num_layers=2, lmax_list=[3], mmax_list=[2], use_grid_mlp=False,
                                            norm_type="rms_norm_sh", use_attn_renorm=False),
    "L4M3_3layers_gate_ln_linref": dict(num_layers=3, lmax_list=[4], mmax_list=[3], use_gate_act=True,
                                        norm_type="layer_norm", load_energy_lin_ref=True,
                                        use_energy_lin_ref=True, grid_resolution=12),
    "L6M2_4layers_released_style": dict(num_layers=4, lmax_list=[6], mmax_list=[2], use_grid_mlp=True,
                                        norm_type="layer_norm_sh", grid_resolution=18),
    "L3M3_untruncated_s2act_msharerad_shared": dict(num_layers=2, lmax_list=[3], mmax_list=[3],
                                                    use_sep_s2_act=False, use_m_share_rad=True,
                                                    share_atom_edge_embedding=True, norm_type="rms_norm_sh"),
    "L5M2_no_atom_edge_embedding_linref_unused": dict(num_layers=2, lmax_list=[5], mmax_list=[2],
                                                      use_atom_edge_embedding=False, use_grid_mlp=True,
                                                      load_energy_lin_ref=True, grid_resolution=14),
}  # fmt: skip


FINE_GRID = [name for name, config in CONFIGS.items() if config.get("grid_resolution")]


def build_pair(config: dict, seed: int = 0):
    """Reference with randomised weights (so norms, biases and references all matter) and
    ours with the reference's state_dict loaded."""
    torch.manual_seed(seed)
    reference = Reference(**config, num_distance_basis=512)  # ignored: it uses 600
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * p.abs().mean().clamp_min(0.05) * torch.randn_like(p))
    ours = EquiformerV2(**config)  # num_distance_basis defaults to 600
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def use_reference_frame(model: EquiformerV2) -> None:
    """Make ``model`` draw its edge frames exactly as the reference does (same RNG calls)."""
    model._edge_rotation = lambda vec: EdgeRotation.from_rotation_matrices(
        init_edge_rot_mat(vec), model.layout
    )


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def compare(reference, ours, batch, train: bool = False, same_frame: bool = False):
    if same_frame:
        use_reference_frame(ours)
    reference.train(train)
    ours.train(train)
    torch.manual_seed(123)
    expected = reference(copy.deepcopy(batch))
    torch.manual_seed(123)
    got = ours(copy.deepcopy(batch))
    return relative_error(got["energy"], expected["energy"]), relative_error(
        got["forces"], expected["forces"]
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_function_as_reference_on_slabs(name, slab_batch):
    reference, ours = build_pair({**BASE, **CONFIGS[name]})
    energy_error, force_error = compare(reference, ours, slab_batch, same_frame=True)
    print(f"{name} (same frame): energy rel err {energy_error:.1e}, forces rel err {force_error:.1e}")
    assert energy_error < ENERGY_TOLERANCE and force_error < FORCE_TOLERANCE


@pytest.mark.parametrize("name", FINE_GRID)
def test_deterministic_frame_matches_reference_on_slabs(name, slab_batch):
    reference, ours = build_pair({**BASE, **CONFIGS[name]})
    energy_error, force_error = compare(reference, ours, slab_batch)
    print(f"{name} (own frame): energy rel err {energy_error:.1e}, forces rel err {force_error:.1e}")
    assert energy_error < ENERGY_TOLERANCE and force_error < FORCE_TOLERANCE


@pytest.mark.parametrize("name", ["L4M3_3layers_gate_ln_linref", "L6M2_4layers_released_style"])
def test_parity_in_train_mode(name, slab_batch):
    reference, ours = build_pair({**BASE, **CONFIGS[name]})
    for same_frame in (True, False):
        energy_error, force_error = compare(reference, ours, slab_batch, train=True, same_frame=same_frame)
        assert energy_error < ENERGY_TOLERANCE and force_error < FORCE_TOLERANCE


@pytest.mark.parametrize("name", ["L2M1_1layer_gridmlp_lnsh", "L3M2_2layers_seps2_rms_norenorm"])
def test_parity_on_molecule_in_box(name, molecule_batch):
    reference, ours = build_pair({**BASE, **CONFIGS[name]})
    energy_error, force_error = compare(reference, ours, molecule_batch, same_frame=True)
    assert energy_error < ENERGY_TOLERANCE and force_error < FORCE_TOLERANCE


def test_parity_with_edges_given(molecule_batch):
    """Non-periodic graph supplied with the data (otf_graph=False), as in fairchem's LMDBs."""
    config = {**BASE, **CONFIGS["L6M2_4layers_released_style"], "use_pbc": False, "otf_graph": False}
    reference, ours = build_pair(config)
    batch = copy.deepcopy(molecule_batch)
    batch.edge_index = radius_graph_nonperiodic(batch.pos, batch.batch, 12.0, 20)
    for same_frame in (True, False):
        energy_error, force_error = compare(reference, ours, batch, same_frame=same_frame)
        assert energy_error < ENERGY_TOLERANCE and force_error < FORCE_TOLERANCE


@pytest.mark.parametrize("name", ["L6M2_4layers_released_style", "L4M3_3layers_gate_ln_linref"])
def test_float32_error_no_worse_than_reference(name, slab_structures):
    """Against our float64 result (the function without rounding), our float32 output is at
    least as accurate as the reference's: the remaining disagreement is float32 rounding."""
    from .conftest import to_batch

    reference, ours = build_pair({**BASE, **CONFIGS[name]})
    use_reference_frame(ours)
    exact = copy.deepcopy(ours).double().eval()
    reference.eval()
    ours.eval()
    batch32, batch64 = to_batch(slab_structures), to_batch(slab_structures, torch.float64)
    errors = {}
    for label, model, batch in [
        ("reference", reference, batch32),
        ("ours", ours, batch32),
        ("exact", exact, batch64),
    ]:
        torch.manual_seed(5)
        errors[label] = model(copy.deepcopy(batch))
    for key in ("energy", "forces"):
        ours_error = relative_error(errors["ours"][key].double(), errors["exact"][key])
        reference_error = relative_error(errors["reference"][key].double(), errors["exact"][key])
        print(f"{name} {key}: float32 error ours {ours_error:.1e}, reference {reference_error:.1e}")
        assert ours_error <= 1.5 * reference_error


def test_reference_spread_is_below_our_tolerance(slab_batch):
    """Calibrates the tolerance: the reference against itself with a different random frame."""
    reference, _ = build_pair({**BASE, **CONFIGS["L6M2_4layers_released_style"]})
    reference.eval()
    torch.manual_seed(1)
    a = reference(copy.deepcopy(slab_batch))
    torch.manual_seed(2)
    b = reference(copy.deepcopy(slab_batch))
    spread = relative_error(a["forces"], b["forces"])
    print(f"reference run-to-run force spread: {spread:.2e}")
    assert 0 < spread < FORCE_TOLERANCE


def test_linear_reference_is_added(slab_batch):
    """E = E_hat + sum_i E_ref[Z_i]/E_std per graph, which fairchem's hydra path drops."""
    config = {**BASE, **CONFIGS["L2M1_1layer_gridmlp_lnsh"], "load_energy_lin_ref": True}
    torch.manual_seed(0)
    with_ref = EquiformerV2(**config, use_energy_lin_ref=True).eval()
    without = EquiformerV2(**config, use_energy_lin_ref=False).eval()
    with torch.no_grad():
        with_ref.energy_lin_ref.copy_(torch.linspace(-3.0, 2.0, 90))
    without.load_state_dict(with_ref.state_dict())
    batch = copy.deepcopy(slab_batch)
    delta = with_ref(batch)["energy"] - without(batch)["energy"]
    expected = torch.zeros(len(batch.natoms)).index_add_(
        0, batch.batch, with_ref.energy_lin_ref[batch.atomic_numbers.long()]
    )
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="load_energy_lin_ref"):
        EquiformerV2(**config | {"load_energy_lin_ref": False}, use_energy_lin_ref=True)
