"""EquiformerV2: determinism, the direct-force head, S2-grid equivariance against the grid
resolution and input checking (the symmetries, batching, gradients and the rest of the generic
checks: the shared battery in test_model_battery.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from e3nn import o3

from fairchem_equiformers import EquiformerV2
from fairchem_equiformers.equiformer_v2.attention import SO2GraphAttention

from .conftest import TINY_V2, molecule_in_box, to_batch
from .model_battery import rotated

GATE = {**TINY_V2, "use_grid_mlp": False, "use_gate_act": True, "lmax_list": [3], "mmax_list": [2]}
RELEASED_STYLE = {**TINY_V2, "lmax_list": [4], "mmax_list": [2], "grid_resolution": 14}


def model_for(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = EquiformerV2(**config).to(dtype).eval()
    with torch.no_grad():  # move away from the symmetric initial norms/biases
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_two_calls_are_identical(slab_batch):
    model = model_for(TINY_V2, torch.float32)
    a, b = model(copy.deepcopy(slab_batch)), model(copy.deepcopy(slab_batch))
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])


def rotation_errors(model, batch, rotations):
    """Worst relative error of energy invariance and force equivariance."""
    base = model(copy.deepcopy(batch))
    worst_e = worst_f = 0.0
    for rotation in rotations:
        out = model(rotated(batch, rotation))
        worst_e = max(
            worst_e, float((out["energy"] - base["energy"]).abs().max() / base["energy"].abs().max())
        )
        error = (out["forces"] - base["forces"] @ rotation.T).abs().max() / base["forces"].abs().max()
        worst_f = max(worst_f, float(error))
    return worst_e, worst_f


@pytest.mark.parametrize("config", [RELEASED_STYLE, GATE], ids=["grid_mlp_L4M2", "gate_L3M2"])
def test_force_head_computes_exactly_the_degree_one_rows_of_the_whole_attention(config, slab_structures):
    """The direct-force head computes only degree 1; the whole attention block on the same
    inputs gives the same forces in its degree-1 rows."""
    model = model_for(config)
    seen = {}
    model.force_block.register_forward_hook(lambda module, args, out: seen.update(args=args, out=out))
    forces = model(to_batch(slab_structures, torch.float64))["forces"]
    assert seen["out"]["forces"].shape == (len(forces), 3)
    _, emb = seen["args"]
    model.force_block.output_degree = None  # the same block, every degree
    whole = SO2GraphAttention.forward(model.force_block, emb["node_embedding"], emb["graph"])  # [N, K, 1]
    torch.testing.assert_close(forces, whole[:, 1:4, 0], atol=1e-12, rtol=0)


def test_s2_grid_equivariance_error_converges_with_resolution_float64(slab_structures):
    """S2 activations sample the sphere on a grid that does not rotate with the input (in the
    released model too): equivariance is approximate, and the error must fall steadily as the
    grid refines -- a wiring bug would leave an error that does not."""
    batch = to_batch(slab_structures, torch.float64)
    torch.manual_seed(7)
    rotations = [o3.rand_matrix(dtype=torch.float64) for _ in range(2)]
    errors = []
    for resolution in (14, 24, 32):
        model = model_for({**RELEASED_STYLE, "grid_resolution": resolution})
        errors.append(rotation_errors(model, batch, rotations))
        print(f"grid {resolution}: rotation error energy {errors[-1][0]:.1e}, forces {errors[-1][1]:.1e}")
    for coarse, fine in zip(errors, errors[1:]):
        assert fine[0] < coarse[0] / 3 and fine[1] < coarse[1] / 3
    # measured at 32 (2026-12-06): energy 8.3e-7, forces 1.0e-4
    assert errors[-1][0] < 2e-6 and errors[-1][1] < 2e-4


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b.atomic_numbers.__setitem__(20, 0), r"graph 1 \(sid 1\), atom 7: atomic number 0"),
        (lambda b: b.atomic_numbers.__setitem__(3, 90), r"graph 0 \(sid 0\), atom 3: atomic number 90"),
        (
            lambda b: b.pos.__setitem__((5, 1), float("nan")),
            r"graph 0 \(sid 0\), atom 5: position .* not finite",
        ),
        (lambda b: b.pos.__setitem__((4, 0), float("inf")), r"atom 4: position .* not finite"),
        (lambda b: b.pos.__setitem__(7, b.pos[6]), r"graph 0 \(sid 0\): atoms 6 and 7 overlap"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, message, slab_batch):
    batch = copy.deepcopy(slab_batch)
    mutate(batch)
    with pytest.raises(ValueError, match=message):
        model_for(TINY_V2, torch.float32)(batch)


def test_overlap_with_a_periodic_image_is_detected(slab_structures):
    atoms = slab_structures[0].copy()
    atoms.positions[1] = atoms.positions[0] + atoms.cell[0]  # same site, one cell over
    with pytest.raises(ValueError, match="atoms 0 and 1 overlap"):
        model_for(TINY_V2)(to_batch([atoms], torch.float64))


def test_empty_batch_is_a_clear_error(slab_batch):
    batch = copy.deepcopy(slab_batch)
    batch.natoms = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="empty batch"):
        model_for(TINY_V2, torch.float32)(batch)


def test_unsupported_options_are_errors():
    with pytest.raises(ValueError, match="lmax_list"):
        EquiformerV2(**{**TINY_V2, "lmax_list": [2, 3], "mmax_list": [1, 1]})
    with pytest.raises(ValueError, match="attn_activation"):
        EquiformerV2(**TINY_V2, attn_activation="scaled_silu")
    with pytest.raises(TypeError, match="not_a_key"):
        EquiformerV2(**TINY_V2, not_a_key=1)


def test_molecule_without_periodicity_builds_its_own_graph():
    """use_pbc=False needs neither torch-cluster nor pyg-lib, and matches the boxed molecule."""
    mol = molecule_in_box("CH3CH2OH")
    config = {**TINY_V2, "max_radius": 4.0}
    boxed = model_for(config)
    free = model_for({**config, "use_pbc": False})
    free.load_state_dict(boxed.state_dict())
    batch = to_batch([mol], torch.float64)
    torch.testing.assert_close(free(copy.deepcopy(batch))["forces"], boxed(copy.deepcopy(batch))["forces"])
