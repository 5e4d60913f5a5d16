"""Deep-equilibrium Equiformer (V1): convergence of the fixed point per structure, implicit against
unrolled gradients, -dE/dpos against finite differences, fixed-point reuse over MD-like frames and
weight normalisation of the e3nn irreps linear layers (float64, tiny models; the V2 tests in
test_deq.py cover the shared solvers and stabiliser functions, the shared battery in
test_model_battery.py symmetry, batching and the other generic checks)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from e3nn import o3

from fairchem_equiformers import DEQEquiformerV1, EquiformerV1
from fairchem_equiformers.deq import DEQConvergenceWarning, IrrepsWeightNorm, apply_weight_norm

from .conftest import molecule_in_box, to_batch
from .model_battery import rotated
from .test_deq import energy_of, finite_difference_error, parameter_gradients
from .test_equiformer_v1 import TINY_V1

# the tiny Equiformer of test_equiformer_v1.py at lmax 1 (2.5x faster per map evaluation), one
# block inside the fixed-point map (plus the output block to irreps_feature)
TINY_DEQ_V1 = {
    **TINY_V1,
    "num_layers": 1,
    "irreps_node_embedding": "8x0e+4x1e",
    "irreps_head": "4x0e+2x1e",
    "irreps_mlp_mid": "16x0e+8x1e",
    "irreps_feature": "16x0e",
}
TIGHT = {"rel_tol": 1e-13, "max_iter": 200}


def deq_model(config=TINY_DEQ_V1, dtype=torch.float64, seed=0, **deq_args) -> DEQEquiformerV1:
    torch.manual_seed(seed)
    model = DEQEquiformerV1(**config, **deq_args).to(dtype).eval()
    with torch.no_grad():  # move away from the symmetric initial norms/biases
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def structures(dtype=torch.float64, count=3):
    """Ethanol, a rattled water and a rattled ammonia, non-periodic (use_pbc=False)."""
    water, ammonia = molecule_in_box("H2O"), molecule_in_box("NH3")
    water.rattle(0.05, seed=1)
    ammonia.rattle(0.05, seed=2)
    return to_batch([molecule_in_box("CH3CH2OH"), water, ammonia][:count], dtype)


def per_structure_norm(x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    per_node = x.flatten(1).pow(2).sum(1)
    return x.new_zeros(num_graphs).index_add(0, batch, per_node).sqrt()


def map_blocks(model) -> torch.nn.ModuleList:
    """The blocks inside the fixed-point map (the wrapped EquiformerV1's all but the last)."""
    return torch.nn.ModuleList(model.interaction_blocks)


# --- the fixed point ------------------------------------------------------------------------------


def test_fixed_point_converges_per_structure():
    """The map f and the returned z* are captured; ||f(z*) - z*|| / ||f(z*)|| is recomputed per
    structure, independently of the solver's own bookkeeping."""
    model = deq_model(solver_eval={"rel_tol": 1e-10, "max_iter": 100})
    captured = {}
    solve_fixed_point = model._fixed_point

    def capturing(f, injection, data):
        z = solve_fixed_point(f, injection, data)
        captured.update(f=f, z=model.last_solve.z, batch=data.batch)
        return z

    model._fixed_point = capturing
    batch = structures()
    out = model(copy.deepcopy(batch))
    with torch.no_grad():
        fz = captured["f"](captured["z"])
    residual = per_structure_norm(fz - captured["z"], captured["batch"], 3)
    relative = residual / per_structure_norm(fz, captured["batch"], 3)
    iterations = model.last_solve.iterations.tolist()
    print(f"iterations per structure {iterations}, relative residuals {relative.tolist()}")
    assert model.last_solve.converged.all() and model.deq_stats["converged_fraction"] == 1.0
    assert (relative <= 1e-10).all()
    torch.testing.assert_close(relative, model.last_solve.rel_residual, rtol=1e-6, atol=1e-16)
    assert per_structure_norm(captured["z"], captured["batch"], 3).min() > 1.0  # not trivially zero
    assert 3 <= max(iterations) < 100
    assert torch.isfinite(out["energy"]).all() and out["forces"].abs().max() > 1e-4


# --- gradients ------------------------------------------------------------------------------------


def test_implicit_gradient_equals_unrolled_gradient_at_a_converged_fixed_point():
    batch = structures(count=2)
    config = {**TINY_DEQ_V1, "regress_forces": False}
    grads = {}
    for gradient in ("ift", "unrolled", "phantom"):  # in training mode, where `gradient` applies
        extra = {"solver_backward": TIGHT} if gradient == "ift" else {}
        model = deq_model(config, gradient=gradient, solver_train=TIGHT, **extra).train()
        grads[gradient] = parameter_gradients(model, batch)
        assert model.deq_stats["converged_fraction"] == 1.0
    scale = grads["unrolled"].abs().max()
    ift_error = float((grads["ift"] - grads["unrolled"]).abs().max() / scale)
    phantom_error = float((grads["phantom"] - grads["unrolled"]).abs().max() / scale)
    print(f"relative gradient error vs unrolled: IFT {ift_error:.1e}, 1-step phantom {phantom_error:.1e}")
    # measured 2026-12-06: 2.0e-12
    assert ift_error < 1e-11
    assert phantom_error > 1e-3  # in training the phantom gradient is an approximation
    phantom_model = deq_model(config, gradient="phantom")  # eval mode
    eval_error = float((parameter_gradients(phantom_model, batch) - grads["ift"]).abs().max() / scale)
    print(f"eval mode, phantom model: gradient error vs IFT {eval_error:.1e}")
    # measured 2026-12-06: 3.2e-10
    assert eval_error < 1e-9  # at inference every model differentiates implicitly


def test_gradient_forces_match_finite_differences():
    """-dE/dpos through the implicit gradient of a converged fixed point against central
    differences of the energy, and against unrolled back-propagation."""
    batch = structures(count=1)
    model = deq_model(gradient="ift", solver_eval=TIGHT, solver_backward=TIGHT)
    forces = model(copy.deepcopy(batch))["forces"]
    unrolled_model = deq_model(gradient="unrolled", solver_train=TIGHT).train()  # unrolled: training only
    unrolled = unrolled_model(copy.deepcopy(batch))["forces"].detach()
    unrolled_error = float((unrolled - forces).abs().max() / forces.abs().max())
    model.regress_forces = False  # energies only for the differences
    h, worst = 1e-5, 0.0
    for atom, axis in [(0, 0), (2, 1), (5, 2), (8, 0)]:
        plus, minus = batch.pos.clone(), batch.pos.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = -(energy_of(model, batch, plus) - energy_of(model, batch, minus)) / (2 * h)
        worst = max(worst, abs(numeric - float(forces[atom, axis])) / float(forces.abs().max()))
    print(f"relative force error: vs finite differences {worst:.1e}, IFT vs unrolled {unrolled_error:.1e}")
    # measured 2026-12-06: 1.1e-12
    assert unrolled_error < 5e-12
    # measured 2026-12-06: 2.9e-10
    assert worst < 1e-9  # truncation ~h^2


# the V1 test slab (Cu(111) 2x2x3 + O, seed 0, 13 atoms), periodic; 100 neighbours, not the 30 of
# test_equiformer_v1.py: with 30 the map converges slowly and erratically (68-85 Anderson
# iterations to rel_tol 1e-10 between the displaced copies), and the solver's residual divided by
# 2h reaches 7e-5 of the forces (2e-6 at rel_tol 1e-12)
SLAB_V1 = {**TINY_DEQ_V1, "use_pbc": True, "max_num_elements": 90, "max_neighbors": 100}
# measured (float64): 1.1e-8 (ethanol, h = 1e-4), 2.1e-8 (slab, h = 3e-5: its truncation error
# is 2.3e-7 at h = 1e-4, on atom 4's y; 1.3e-8 at 1e-5); pinned with a margin
DEFAULT_FD_TOLERANCE = {"molecule": 1e-7, "slab": 1e-7}


@pytest.mark.parametrize("system", ["molecule", "slab"])
def test_default_inference_forces_are_the_gradient_of_the_returned_energy(system):
    """Default DEQ settings (implicit training gradient, default solvers, V1's -dE/dpos forces), eval
    mode, float64: central differences (h = 1e-4 A) of the returned energy equal the returned
    forces (before the precise inference solve and implicit gradient: 0.98 relative off)."""
    from .conftest import slab_with_adsorbate

    if system == "molecule":
        model, batch = deq_model(), structures(count=1)
        components, h = [(0, 0), (1, 2), (2, 1), (3, 2), (5, 2), (8, 0)], 1e-4
    else:
        model = deq_model(SLAB_V1)
        batch = to_batch([slab_with_adsorbate("Cu", "111", "O", seed=0)], torch.float64)
        components, h = [(i, i % 3) for i in range(13)] + [(12, 0), (0, 2), (1, 2)], 3e-5
    assert model.gradient == "ift" and model.solver_eval is None and not model.direct_forces
    with warnings.catch_warnings():
        warnings.simplefilter("error", DEQConvergenceWarning)  # the precise solves converge
        worst = finite_difference_error(model, batch, components, h)
    print(f"{system} (h = {h:g}): worst relative force error vs central differences {worst:.1e}")
    print(f"solver: {model.deq_stats}")
    assert model.deq_stats["rel_residual"] <= 1e-10
    # measured 2026-12-06: 1.1e-8 (molecule), 2.1e-8 (slab)
    assert worst < DEFAULT_FD_TOLERANCE[system]


# --- fixed-point reuse ----------------------------------------------------------------------------


def md_like_frames(frames: int = 6, step: float = 0.003):
    """Ethanol moving along random directions, ~``step`` A per coordinate and frame (the size of an
    MD step of 0.5-1 fs at room temperature)."""
    batch = structures(count=1)
    generator = torch.Generator().manual_seed(3)
    velocity = torch.randn(batch.pos.shape, generator=generator, dtype=torch.float64)
    out = []
    for t in range(frames):
        frame = copy.deepcopy(batch)
        frame.pos = batch.pos + step * t * velocity
        out.append(frame)
    return out


def test_reuse_across_md_like_frames_cuts_solver_iterations():
    settings = {"rel_tol": 1e-4, "max_iter": 100}  # the default evaluation tolerance
    model = deq_model(solver_eval=settings, solver_reuse=settings)
    frames = md_like_frames()
    runs = {}
    for reuse in (False, True):
        model.reuse_fixed_point = reuse
        model.reset_fixed_point()
        iterations, energies, reused = [], [], []
        for frame in frames:
            energies.append(float(model(copy.deepcopy(frame))["energy"]))
            iterations.append(int(model.last_solve.iterations.sum()))
            reused.append(model.deq_stats["reused_fraction"])
        runs[reuse] = (iterations, energies, reused)
    (cold, cold_energy, _), (warm, warm_energy, reused) = runs[False], runs[True]
    scale = max(abs(e) for e in cold_energy)
    energy_change = max(abs(a - b) for a, b in zip(cold_energy, warm_energy)) / scale
    print(f"iterations per frame without reuse {cold}, with reuse {warm}; "
          f"relative energy difference {energy_change:.1e}")  # fmt: skip
    assert reused == [0.0] + [1.0] * (len(frames) - 1)
    assert warm[0] == cold[0]  # the first frame has nothing to reuse
    assert sum(warm[1:]) < 0.7 * sum(cold[1:])
    # measured 2026-12-06: 5.5e-5
    assert energy_change < 2e-4  # the same energies within (2x) the solver tolerance
    # other atoms: the stored fixed point is not used
    model(structures(count=2))
    assert model.deq_stats["reused_fraction"] == 0.5  # ethanol reused, water starts from zero


# --- weight normalisation -------------------------------------------------------------------------


def test_weight_norm_covers_the_irreps_linear_layers_and_keeps_the_function():
    batch = structures(count=2)
    plain = deq_model()
    normalised = copy.deepcopy(plain)
    names = apply_weight_norm(map_blocks(normalised))
    for expected in ["0.attention.merge_source", "0.attention.merge_target", "0.attention.alpha_linear",
                     "0.attention.value_linear", "0.attention.value_projection", "0.attention.projection",
                     "0.ffn.linear_in", "0.ffn.linear_out"]:  # fmt: skip
        assert expected in names
        layer = map_blocks(normalised).get_submodule(expected)
        assert isinstance(layer, o3.Linear)
        parameters = dict(layer.named_parameters())
        assert "parametrizations.weight.original" in parameters
        assert parameters["parametrizations.weight.0.scale"].numel() == layer.irreps_out.num_irreps
    every_linear = [
        n for n, m in map_blocks(plain).named_modules() if isinstance(m, (o3.Linear, torch.nn.Linear))
    ]
    assert sorted(names) == sorted(every_linear)  # radial MLPs' nn.Linear too
    print(f"{len(names)} weight-normalised layers in the map")

    # one norm per output channel of each output irrep block, over every path into it
    layer = map_blocks(normalised)[0].ffn.linear_in
    norm = layer.parametrizations.weight[0]
    assert isinstance(norm, IrrepsWeightNorm)
    with torch.no_grad():
        norm.scale.fill_(1.0)
        squares = torch.zeros(layer.irreps_out.num_irreps, dtype=torch.float64)
        offsets = [0, *torch.tensor([mul for mul, _ in layer.irreps_out]).cumsum(0).tolist()]
        weight, start = layer.weight, 0  # blocks [mul_in, mul_out] in path order (biases apart)
        for ins in layer.instructions:
            if ins.i_in == -1:
                continue
            view = weight[start : start + ins.path_shape[0] * ins.path_shape[1]].view(ins.path_shape)
            start += view.numel()
            squares[offsets[ins.i_out] : offsets[ins.i_out + 1]] += view.pow(2).sum(0)
        assert start == weight.numel()
    torch.testing.assert_close(squares, torch.ones_like(squares), rtol=1e-12, atol=0)

    normalised = copy.deepcopy(plain)
    apply_weight_norm(map_blocks(normalised))
    base = plain(copy.deepcopy(batch))
    same = normalised(copy.deepcopy(batch))
    energy_error = float((same["energy"] - base["energy"]).abs().max() / base["energy"].abs().max())
    assert energy_error < 1e-12
    # the effect: the map depends on the directions only through their orientation
    with torch.no_grad():
        for name, p in normalised.named_parameters():
            if name.endswith("weight.original"):
                p.mul_(3.0)
        for module in map_blocks(plain).modules():
            if isinstance(module, (o3.Linear, torch.nn.Linear)):
                module.weight.mul_(3.0)
    scaled_error = float(
        (normalised(copy.deepcopy(batch))["energy"] - base["energy"]).abs().max() / base["energy"].abs().max()
    )
    with warnings.catch_warnings():  # the scaled plain map need not converge any more
        warnings.simplefilter("ignore", DEQConvergenceWarning)
        plain_change = float((plain(copy.deepcopy(batch))["energy"] - base["energy"]).abs().max())
    print(f"weight norm: energy change {energy_error:.1e} when applied, {scaled_error:.1e} with directions "
          f"x3; plain weights x3 change it by {plain_change:.2e}")  # fmt: skip
    # measured 2026-12-06: 1.0e-16
    assert scaled_error < 1e-12
    assert plain_change > 1e-3

    # the normalised model stays rotation invariant with any scales
    model = deq_model(weight_norm=True, solver_eval=TIGHT)
    assert len(model.weight_normalised) == len(names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight.0.scale"):
                p.mul_(1 + 0.2 * torch.rand_like(p))
    rotation = o3.rand_matrix(dtype=torch.float64)
    base, out = model(copy.deepcopy(batch)), model(rotated(batch, rotation))
    # measured 2026-12-06: 1.1e-15 (energy), 1.1e-15 (forces)
    torch.testing.assert_close(out["energy"], base["energy"], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["forces"], base["forces"] @ rotation.T, rtol=0, atol=1e-12)


# --- construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"solver": "newton"}, "solver='newton'"),
        ({"gradient": "adjoint"}, "gradient='adjoint'"),
        ({"alpha_drop": 0.1}, "alpha_drop must be 0 in DEQEquiformerV1"),
        ({"drop_path_rate": 0.1}, "drop_path_rate must be 0 in DEQEquiformerV1"),
        ({"solver_backward": {"rel_tol": 1e-6, "max_iters": 3}}, r"solver_backward: unknown key"),
        ({"num_layers": 0}, "num_layers=0"),
        ({"num_layer": 2}, "num_layer"),
    ],
)
def test_bad_arguments_are_clear_errors(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DEQEquiformerV1(**{**TINY_DEQ_V1, **bad})


def test_structure_and_defaults():
    """The map's blocks stay on the node irreps, the output block is EquiformerV1's last; the
    default model (the paper's MD17 L2 irreps, one block in the map) builds and converges."""
    torch.manual_seed(0)
    model = DEQEquiformerV1(**{**TINY_DEQ_V1, "num_layers": 2})
    explicit = EquiformerV1(**{**TINY_DEQ_V1, "num_layers": 3})
    norms = sum(p.numel() for m in (model.injection_norm, model.fixed_point_norm) for p in m.parameters())
    assert model.num_params == explicit.num_params + norms
    assert len(model.interaction_blocks) == 2 and model.interaction_blocks[1].shortcut is None
    assert model.blocks[-1].shortcut is not None  # the output block: node irreps -> irreps_feature
    assert "solver=anderson, gradient=ift" in repr(model)

    model = DEQEquiformerV1().double().eval()  # every argument has a default
    out = model(structures(count=1))
    print(f"default model: {model.num_params} parameters, solver {model.deq_stats}")
    assert out["energy"].dtype == torch.float64 and torch.isfinite(out["forces"]).all()
    assert model.deq_stats["converged_fraction"] == 1.0
