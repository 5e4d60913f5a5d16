"""The shared equivariant primitives, checked in float64 against e3nn and by symmetry."""

from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3
from torch_geometric.utils import softmax as pyg_softmax

from fairchem_equiformers.primitives import (
    NORMS,
    EdgeRotation,
    GateActivation,
    S2Grid,
    SO2Convolution,
    SphericalLayout,
    graph_softmax,
    radius_graph_nonperiodic,
)
from fairchem_equiformers.primitives._wigner import (
    FRAME_POLE,
    edge_frame_angles,
    frame_tilt,
    swap_matrix,
    wigner_d_columns,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def block_diag_wigner(rotation: torch.Tensor, lmax: int) -> torch.Tensor:
    """Dense [K, K] Wigner-D of a 3x3 rotation from our blocks (full mmax)."""
    blocks = []
    points = torch.randn(60, 3)
    for l in range(lmax + 1):
        y0 = o3.spherical_harmonics(l, points, normalize=True)
        y1 = o3.spherical_harmonics(l, points @ rotation.T, normalize=True)
        blocks.append(torch.linalg.lstsq(y0, y1).solution.T)
    return torch.block_diag(*blocks)


def test_wigner_columns_rotate_harmonics():
    torch.manual_seed(0)
    vec = torch.randn(16, 3)
    angles = edge_frame_angles(vec)
    alpha, beta = o3.xyz_to_angles(vec)
    rotation = o3.angles_to_matrix(alpha, beta, torch.zeros_like(alpha))  # [E, 3, 3]
    v = torch.randn(3)
    for l, block in enumerate(wigner_d_columns(*angles, lmax=6, mmax=6)):
        lhs = block @ o3.spherical_harmonics(l, v, normalize=True)
        rhs = o3.spherical_harmonics(l, rotation @ v, normalize=True)
        torch.testing.assert_close(lhs, rhs, atol=1e-13, rtol=0)
        eye = torch.eye(2 * l + 1).expand_as(block)
        torch.testing.assert_close(block @ block.transpose(1, 2), eye, atol=1e-13, rtol=0)


@pytest.mark.parametrize(
    "direction",
    [
        [0.0, 1.0, 0.0],
        [0.0, -2.0, 0.0],
        [1e-9, 1.0, 0.0],
        [0.3, -0.2, 0.9],
        list(FRAME_POLE),
        [-c for c in FRAME_POLE],
    ],
)
def test_edge_frame_puts_edge_on_polar_axis(direction):
    layout = SphericalLayout(4, 4)
    vec = torch.tensor([direction])
    rotation = EdgeRotation.from_edge_vectors(vec, layout)
    unit = vec / vec.norm()
    sh = o3.spherical_harmonics(list(range(5)), unit, normalize=True)  # [1, K]
    rotated = rotation.to_edge(sh[:, :, None])[0, :, 0]  # edge layout
    for (l, m), value in zip(layout.edge_lm, rotated.tolist()):
        expected = o3.spherical_harmonics(l, torch.tensor([0.0, 1.0, 0.0]), normalize=True)[l].item()
        assert value == pytest.approx(expected if m == 0 else 0.0, abs=1e-12)


def test_frame_from_rotation_matrices_spins_about_the_edge():
    """Any frame that maps the edge onto +y gives the same rotated m=0 content; a frame spun
    by gamma about the edge rotates each (+m, -m) pair by m*gamma."""
    torch.manual_seed(8)
    layout = SphericalLayout(3, 2)
    vec = torch.randn(6, 3)
    tilt = frame_tilt().to(vec)  # the plain frame: Euler angles of Q u, then Q^T
    alpha, beta = o3.xyz_to_angles(vec @ tilt.T)
    gamma = torch.rand(6) * 6.28
    to_y = o3.angles_to_matrix(alpha, beta, gamma).transpose(1, 2) @ tilt  # [E, 3, 3], edge -> +y
    unit = vec / vec.norm(dim=1, keepdim=True)
    # measured 2026-12-06: 2.2e-16
    torch.testing.assert_close(
        torch.einsum("eij,ej->ei", to_y, unit),
        torch.tensor([[0.0, 1.0, 0.0]]).expand(6, 3),
        atol=1e-13,
        rtol=0,
    )
    spun = EdgeRotation.from_rotation_matrices(to_y, layout)
    plain = EdgeRotation.from_edge_vectors(vec, layout)
    x = torch.randn(6, layout.num_coefficients, 3)
    a, b = plain.to_edge(x), spun.to_edge(x)
    for i, (l, m) in enumerate(layout.edge_lm):
        if m == 0:
            torch.testing.assert_close(a[:, i], b[:, i], atol=1e-12, rtol=0)
        if m > 0:
            j = layout.edge_index_of(l, -m)
            c, s = torch.cos(m * gamma)[:, None], torch.sin(m * gamma)[:, None]
            rotated = torch.stack([c * a[:, i] + s * a[:, j], -s * a[:, i] + c * a[:, j]])
            same = torch.allclose(rotated, torch.stack([b[:, i], b[:, j]]), rtol=0, atol=1e-12)
            flipped = torch.stack([c * a[:, i] - s * a[:, j], s * a[:, i] + c * a[:, j]])
            # measured 2026-12-06: 1.5e-14 (same spin; before, allclose's default rtol=1e-5 applied)
            assert same or torch.allclose(flipped, torch.stack([b[:, i], b[:, j]]), rtol=0, atol=1e-12)


def test_rotation_round_trip_without_truncation():
    torch.manual_seed(1)
    layout = SphericalLayout(5, 5)
    rotation = EdgeRotation.from_edge_vectors(torch.randn(10, 3), layout)
    x = torch.randn(10, layout.num_coefficients, 7)
    torch.testing.assert_close(rotation.from_edge(rotation.to_edge(x)), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("lmax,mmax", [(2, 1), (4, 2), (6, 3), (3, 3)])
def test_so2_message_is_equivariant(lmax, mmax):
    """rotate in -> SO(2) conv -> rotate out commutes with any global rotation, even though
    the edge frame's spin about the edge is chosen differently for the rotated edge."""
    torch.manual_seed(lmax * 10 + mmax)
    layout = SphericalLayout(lmax, mmax)
    conv = SO2Convolution(layout, 6, 5, radial_channels=[3, 8], extra_m0_channels=4)
    vec, x, scalars = torch.randn(9, 3), torch.randn(9, layout.num_coefficients, 6), torch.randn(9, 3)

    def message(v, features):
        rot = EdgeRotation.from_edge_vectors(v, layout)
        out, extra = conv(rot.to_edge(features), scalars)
        return rot.from_edge(out), extra

    R = o3.rand_matrix()
    D = block_diag_wigner(R, lmax)
    out, extra = message(vec, x)
    out_rot, extra_rot = message(vec @ R.T, torch.einsum("ij,ejc->eic", D, x))
    # measured 2026-12-06: 2.1e-14 (messages), 4.0e-15 (extra m=0 channels), max over the 4 (lmax, mmax)
    torch.testing.assert_close(out_rot, torch.einsum("ij,ejc->eic", D, out), atol=1e-13, rtol=0)
    torch.testing.assert_close(extra_rot, extra, atol=1e-13, rtol=0)


def test_so2_order_map_equals_the_complex_product_with_first_and_second_derivatives():
    """Three real matmuls (Gauss) give (W_r + i W_i)(x_+m + i x_-m), the map the released
    checkpoints were trained with, and so do their gradients to second order."""
    from fairchem_equiformers.primitives._so2 import SO2OrderLinear

    torch.manual_seed(4)
    linear = SO2OrderLinear(num_degrees=3, in_channels=4, out_channels=2)
    x = torch.randn(7, 2, 3 * 4, requires_grad=True)  # [E, (+m, -m), D * C_in]
    w_real, w_imag = linear.fc.weight.detach().chunk(2)
    expected = torch.stack(
        [x[:, 0] @ w_real.T - x[:, 1] @ w_imag.T, x[:, 0] @ w_imag.T + x[:, 1] @ w_real.T], 1
    ).view(7, 2 * 3, 2)
    torch.testing.assert_close(linear(x), expected, atol=1e-13, rtol=0)
    weight = linear.fc.weight

    def apply(features, w):
        w_r, w_i = w.chunk(2)
        return linear(features, (w_r, w_i, w_r + w_i))

    assert torch.autograd.gradcheck(apply, (x, weight))
    assert torch.autograd.gradgradcheck(apply, (x, weight))
    # frozen weights (fine-tuning other parts, MD): only the feature gradient
    frozen = weight.detach()
    (grad_x,) = torch.autograd.grad(apply(x, frozen).pow(2).sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.pow(2).sum(), x)
    torch.testing.assert_close(grad_x, expected_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("lmax,mmax", [(4, 2), (3, 3)])
def test_so2_single_degree_outputs_equal_those_rows_of_the_full_convolution(lmax, mmax):
    """A head that reads one degree gets exactly the rows the whole convolution would give it,
    and the rotation back of those rows gives that degree's node rows."""
    torch.manual_seed(5)
    layout = SphericalLayout(lmax, mmax)
    conv = SO2Convolution(layout, 6, 5, radial_channels=[3, 8], extra_m0_channels=4)
    rotation = EdgeRotation.from_edge_vectors(torch.randn(9, 3), layout)
    x, scalars = torch.randn(9, layout.num_edge_coefficients, 6), torch.randn(9, 3)
    full, _ = conv(x, scalars)  # [E, K_e, 5]
    node = rotation.from_edge(full)  # [E, K, 5]
    for degree in range(lmax + 1):
        rows = layout.degree_edge_rows(degree)
        assert [layout.edge_lm[k] for k in rows][0] == (degree, 0) and len(rows) == 2 * min(degree, mmax) + 1
        single = conv.forward_degree(x, degree, scalars)
        torch.testing.assert_close(single, full[:, rows], atol=1e-12, rtol=0)
        node_rows = node[:, degree**2 : (degree + 1) ** 2]
        torch.testing.assert_close(rotation.from_edge_degree(single, degree), node_rows, atol=1e-12, rtol=0)


@pytest.mark.parametrize("norm_type", sorted(NORMS))
def test_norms_are_equivariant(norm_type):
    torch.manual_seed(3)
    lmax = 3
    norm = NORMS[norm_type](lmax, 8)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, (lmax + 1) ** 2, 8)
    D = block_diag_wigner(o3.rand_matrix(), lmax)
    torch.testing.assert_close(
        norm(torch.einsum("ij,njc->nic", D, x)), torch.einsum("ij,njc->nic", D, norm(x)), atol=1e-12, rtol=0
    )


def test_gate_activation_is_equivariant():
    torch.manual_seed(4)
    lmax = 3
    degrees = [l for l in range(1, lmax + 1) for _ in range(2 * l + 1)]
    gate = GateActivation(degrees, lmax, 4)
    x, gates = torch.randn(6, 16, 4), torch.randn(6, lmax * 4)
    D = block_diag_wigner(o3.rand_matrix(), lmax)
    torch.testing.assert_close(
        gate(gates, torch.einsum("ij,njc->nic", D, x)),
        torch.einsum("ij,njc->nic", D, gate(gates, x)),
        atol=1e-12,
        rtol=0,
    )


def test_s2_grid_round_trip_is_exact_for_band_limited_functions():
    layout = SphericalLayout(4, 4)
    grid = S2Grid(layout, None, edge_layout=False)
    x = torch.randn(3, layout.num_coefficients, 2)
    torch.testing.assert_close(grid.from_grid(grid.to_grid(x)), x, atol=1e-12, rtol=0)


def test_s2_grid_edge_layout_matches_node_layout_columns():
    layout = SphericalLayout(4, 2)
    edge, node = S2Grid(layout, 10, edge_layout=True), S2Grid(SphericalLayout(4, 4), 10, edge_layout=False)
    for i, (l, m) in enumerate(layout.edge_lm):
        torch.testing.assert_close(
            edge.to_grid_matrix[:, i], node.to_grid_matrix[:, l * l + l + m] * layout.truncation_rescale(l)
        )


def test_swap_matrix_is_the_exact_wigner_d_of_the_axis_swap():
    """J_l = D(pi/2, pi/2, pi/2) from e3nn's float64 generators: Y(R v) = J Y(v) to round-off
    (measured 1.2e-14 at l = 9, orthogonality 2.6e-14; e3nn's float32 generators would give 7e-7)."""
    half_pi = torch.tensor(math.pi / 2, dtype=torch.float64)
    rotation = o3.angles_to_matrix(half_pi, half_pi, half_pi)
    points = torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for l in range(11):
        swap = swap_matrix(l)
        before = o3.spherical_harmonics(l, points, normalize=True)
        after = o3.spherical_harmonics(l, points @ rotation.T, normalize=True)
        assert swap.dtype == torch.float64
        assert float((after - before @ swap.T).abs().max()) < 2e-14
        identity = torch.eye(2 * l + 1, dtype=torch.float64)
        assert float((swap @ swap.T - identity).abs().max()) < 5e-14


def test_graph_softmax_matches_torch_geometric():
    torch.manual_seed(5)
    logits, target = 30 * torch.randn(40, 3), torch.randint(0, 7, (40,))
    ours = graph_softmax(logits, target, 9)  # nodes 7, 8 have no edges
    torch.testing.assert_close(ours, pyg_softmax(logits, target, num_nodes=9), atol=1e-14, rtol=0)
    sums = torch.zeros(9, 3).index_add_(0, target, ours)
    present = torch.bincount(target, minlength=9) > 0
    # measured 2026-12-06: 2.2e-16
    torch.testing.assert_close(sums[present], torch.ones_like(sums[present]), atol=1e-13, rtol=0)


def test_radius_graph_nonperiodic_against_brute_force():
    torch.manual_seed(6)
    pos = 4 * torch.rand(25, 3)
    batch = torch.tensor([0] * 10 + [1] * 15)
    edges = radius_graph_nonperiodic(pos, batch, cutoff=2.0, max_neighbors=100)
    expected = {
        (j, i)
        for i in range(25)
        for j in range(25)
        if i != j and batch[i] == batch[j] and (pos[i] - pos[j]).norm() < 2.0
    }
    assert set(map(tuple, edges.T.tolist())) == expected
    capped = radius_graph_nonperiodic(pos, batch, cutoff=2.0, max_neighbors=3)
    assert torch.bincount(capped[1], minlength=25).max() <= 3
    for j, i in capped.T.tolist():  # each kept source is among the 3 nearest of its target
        same = (batch == batch[i]).nonzero().flatten().tolist()
        dists = sorted((pos[k] - pos[i]).norm().item() for k in same if k != i)
        assert (pos[j] - pos[i]).norm().item() <= dists[2] + 1e-12


def test_chunked_grid_silu_equals_the_plain_expression_with_first_and_second_derivatives(monkeypatch):
    """The S2 activation runs a few rows at a time and recomputes grid values in the backward;
    values are bit-identical to from_grid(silu(to_grid(x))), and gradients (also second order,
    used by conservative-force training) are exact."""
    from fairchem_equiformers.primitives import _activation as activation

    grid = S2Grid(SphericalLayout(3, 2), 8, edge_layout=True)
    x = torch.randn(7, grid.to_grid_matrix.shape[1], 3, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(activation, "GRID_CHUNK_ELEMENTS", 2 * 64 * 3)  # 2 rows per chunk
    plain = grid.from_grid(torch.nn.functional.silu(grid.to_grid(x)))
    assert torch.equal(activation.grid_silu(grid, x), plain)
    assert torch.autograd.gradcheck(lambda x: activation.grid_silu(grid, x), (x,))
    assert torch.autograd.gradgradcheck(lambda x: activation.grid_silu(grid, x), (x,))


def test_chunked_grid_mlp_equals_the_plain_expression_with_first_and_second_derivatives(monkeypatch):
    """The feed-forward grid MLP applies its first and last layers on the coefficients, runs the
    rest a few rows at a time and recomputes its grid activations in the backward: same values
    as from_grid(mlp(to_grid(x))) and exact gradients for the input and the three weights (also
    second order)."""
    from torch import nn

    from fairchem_equiformers.primitives import _activation as activation

    torch.manual_seed(0)
    grid = S2Grid(SphericalLayout(2, 2), 6, edge_layout=False)
    mlp = nn.Sequential(
        nn.Linear(3, 4, bias=False),
        nn.SiLU(),
        nn.Linear(4, 5, bias=False),
        nn.SiLU(),
        nn.Linear(5, 2, bias=False),
    ).double()
    x = torch.randn(5, 9, 3, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(activation, "GRID_CHUNK_ELEMENTS", 2 * 36 * 5)  # 2 rows per chunk
    plain = grid.from_grid(mlp(grid.to_grid(x)))
    torch.testing.assert_close(activation.grid_mlp(grid, mlp, x), plain, rtol=1e-14, atol=1e-14)

    def chunked(x, w1, w2, w3):
        for layer, weight in zip(mlp[::2], (w1, w2, w3)):
            layer.weight = weight
        return activation.grid_mlp(grid, mlp, x)

    inputs = (x, *(nn.Parameter(layer.weight.detach().clone()) for layer in mlp[::2]))
    assert torch.autograd.gradcheck(chunked, inputs)
    assert torch.autograd.gradgradcheck(chunked, inputs)


def test_gather_to_edge_equals_rotating_the_concatenation_with_first_and_second_derivatives(monkeypatch):
    """Source and target features rotated into the edge frame, side by side, split into orders:
    the fused gather and rotation (blocks of edges, custom backward) gives the plain
    expression's values and its exact first and second derivatives with respect to the
    features and the matrices."""
    from fairchem_equiformers.primitives import EdgeRotation, SphericalLayout
    from fairchem_equiformers.primitives import _rotation as rotation

    monkeypatch.setattr(rotation, "GATHER_BLOCK_ELEMENTS", 60)  # blocks of 2 edges
    torch.manual_seed(0)
    layout = SphericalLayout(2, 1)
    rot = EdgeRotation.from_edge_vectors(torch.randn(7, 3, dtype=torch.float64), layout)
    matrix = rot.to_edge_matrix.detach().requires_grad_()
    x = torch.randn(4, layout.num_coefficients, 3, dtype=torch.float64, requires_grad=True)
    edge_index = torch.randint(0, 4, (2, 7))
    edge_index[:, 0] = torch.tensor([2, 2])  # both halves from one node
    plain = rot.to_edge(torch.cat([x[edge_index[0]], x[edge_index[1]]], dim=-1))
    orders = rot.gather_to_edge(x, edge_index)
    assert [o.shape[1] for o in orders] == layout.order_rows
    torch.testing.assert_close(torch.cat(orders, dim=1), plain, rtol=0, atol=1e-14)

    def fused(x, matrix):
        rot.to_edge_matrix = matrix
        return torch.cat(rot.gather_to_edge(x, edge_index), dim=1)

    assert torch.autograd.gradcheck(fused, (x, matrix))
    assert torch.autograd.gradgradcheck(lambda x, m: fused(x, m).sin(), (x, matrix))
