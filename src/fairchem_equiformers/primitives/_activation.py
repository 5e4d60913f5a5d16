"""Equivariant non-linearities."""

from __future__ import annotations

import torch
from torch import nn

from ._autocast import accumulation_dtype, under_autocast
from ._blocks import row_blocks
from ._grid import S2Grid


class SmoothLeakyReLU(nn.Module):
    """``(1+a)/2 x + (1-a)/2 x (2 sigmoid(x) - 1)``: a smooth leaky ReLU (slope a for x << 0)."""

    def __init__(self, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.negative_slope
        return (1 + a) / 2 * x + (1 - a) / 2 * x * (2 * torch.sigmoid(x) - 1)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class GateActivation(nn.Module):
    """SiLU on the scalar coefficient; every other coefficient scaled by a sigmoid gate of its
    degree and channel.

    ``degrees``: the degree of each coefficient after the first (the scalar).
    Shapes: ``gates: [*, lmax * C]``, ``x: [*, K', C] -> [*, K', C]``."""

    def __init__(self, degrees: list[int], lmax: int, num_channels: int) -> None:
        super().__init__()
        self.lmax, self.num_channels = lmax, num_channels
        self.register_buffer("gate_index", torch.tensor([l - 1 for l in degrees]), persistent=False)

    def forward(self, gates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(gates).view(x.shape[0], self.lmax, self.num_channels)
        gates = gates.index_select(1, self.gate_index)  # [*, K'-1, C]
        scalar, rest = x.split([1, x.shape[1] - 1], dim=1)
        return torch.cat([nn.functional.silu(scalar), rest * gates], dim=1)


# Grid values per chunk of ``grid_silu`` (floats): small enough to stay in cache.
GRID_CHUNK_ELEMENTS = 1 << 19


def _row_chunks(rows: int, row_elements: int) -> list[slice]:
    return row_blocks(rows, row_elements, GRID_CHUNK_ELEMENTS)


def _silu_grad(grad: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``grad * silu'(values)``: one fused kernel, or differentiable operations when the
    backward itself is being recorded (aten's ``silu_backward`` has no derivative)."""
    if not torch.is_grad_enabled():
        return torch.ops.aten.silu_backward(grad, values)
    sigmoid = torch.sigmoid(values)
    return grad * (sigmoid * (1 + values * (1 - sigmoid)))


class _GridSiLU(torch.autograd.Function):
    """``from_grid(silu(to_grid(x)))`` a chunk of rows at a time. The grid values ``[B, G, C]``,
    an order of magnitude larger than ``x``, are never held whole: not in the forward, and not
    for the backward, which recomputes them per chunk from ``x``. Same arithmetic per row as
    the unchunked expression (bit-identical results); double backward works (the backward is
    built from differentiable operations when a graph is requested)."""

    @staticmethod
    @under_autocast
    def forward(ctx, x, to_grid, from_grid_t):  # x [B, K', C], to_grid [G, K'], from_grid_t [K', G]
        ctx.save_for_backward(x, to_grid, from_grid_t)
        out = x.new_empty(x.shape[0], from_grid_t.shape[0], x.shape[2])
        for rows in _row_chunks(x.shape[0], to_grid.shape[0] * x.shape[2]):
            values = to_grid @ x[rows]  # [b, G, C]
            torch.matmul(from_grid_t, nn.functional.silu(values, inplace=True), out=out[rows])
        return out

    @staticmethod
    @under_autocast
    def backward(ctx, grad_out):  # [B, K', C]
        x, to_grid, from_grid_t = ctx.saved_tensors
        chunks = []
        for rows in _row_chunks(x.shape[0], to_grid.shape[0] * x.shape[2]):
            values = to_grid @ x[rows]  # [b, G, C]
            grad_values = _silu_grad(from_grid_t.T @ grad_out[rows], values)
            chunks.append(to_grid.T @ grad_values)  # [b, K', C]
        return torch.cat(chunks), None, None


def grid_silu(grid: S2Grid, x: torch.Tensor) -> torch.Tensor:
    """SiLU of the function on the grid, projected back: ``[*, K', C] -> [*, K', C]``."""
    to_grid = grid.to_grid_matrix.to(x.dtype)
    from_grid_t = grid.from_grid_matrix.to(x.dtype).T
    rows = x.reshape(-1, *x.shape[-2:])
    return _GridSiLU.apply(rows, to_grid, from_grid_t).view(x.shape)


class _GridMLPCore(torch.autograd.Function):
    """``from_grid(silu(W2 silu(to_grid(h))))``: the grid MLP's part that needs the grid, a
    chunk of rows at a time, with a backward that recomputes each chunk's grid activations
    instead of storing ``[B, G, H]`` tensors. ``w2`` is an ``nn.Linear`` weight (``[out, in]``,
    no bias). Double backward works (differentiable operations when a graph is requested)."""

    @staticmethod
    @under_autocast
    def forward(ctx, h, to_grid, from_grid_t, w2):  # h [B, K, H]
        ctx.save_for_backward(h, to_grid, from_grid_t, w2)
        out = h.new_empty(h.shape[0], from_grid_t.shape[0], w2.shape[0])
        for rows in _row_chunks(h.shape[0], to_grid.shape[0] * max(w2.shape)):
            act_1 = nn.functional.silu(to_grid @ h[rows], inplace=True)  # [b, G, H]
            act_2 = nn.functional.silu(nn.functional.linear(act_1, w2), inplace=True)
            torch.matmul(from_grid_t, act_2, out=out[rows])
        return out

    @staticmethod
    @under_autocast
    def backward(ctx, grad_out):  # [B, K, H]
        h, to_grid, from_grid_t, w2 = ctx.saved_tensors
        grad_h, grad_w2 = [], 0
        for rows in _row_chunks(h.shape[0], to_grid.shape[0] * max(w2.shape)):
            pre_1 = to_grid @ h[rows]  # [b, G, H]
            act_1 = nn.functional.silu(pre_1)
            pre_2 = nn.functional.linear(act_1, w2)
            grad_pre_2 = _silu_grad(from_grid_t.T @ grad_out[rows], pre_2)  # [b, G, H]
            grad_w2 = grad_w2 + (grad_pre_2.flatten(0, 1).T @ act_1.flatten(0, 1)).to(accumulation_dtype(h))
            grad_pre_1 = _silu_grad(grad_pre_2 @ w2, pre_1)
            grad_h.append(to_grid.T @ grad_pre_1)  # [b, K, H]
        return torch.cat(grad_h), None, None, grad_w2


def grid_mlp(grid: S2Grid, mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp`` (Linear, SiLU, Linear, SiLU, Linear; no biases) at every grid point of the
    function ``x: [N, K, C]``, projected back: ``[N, K, H]``.

    The grid transforms act on the coefficients and the linear layers on the channels, so the
    first layer is applied before ``to_grid`` and the last after ``from_grid``: on ``K``
    coefficients instead of ``G`` grid points (at L4 on an 18 x 18 grid, 25 rather than 324),
    the same function. Only the middle layer, between the two SiLUs, runs on the grid."""
    to_grid = grid.to_grid_matrix.to(x.dtype)
    from_grid_t = grid.from_grid_matrix.to(x.dtype).T
    hidden = nn.functional.linear(x, mlp[0].weight)  # [N, K, H]
    hidden = _GridMLPCore.apply(hidden, to_grid, from_grid_t, mlp[2].weight)  # [N, K, H]
    return nn.functional.linear(hidden, mlp[4].weight)


class _GridProduct(torch.autograd.Function):
    """``m3 @ ((m1 @ u) * (m2 @ v))`` a chunk of rows at a time: the pointwise product of two
    functions on the grid, projected back (``m1 = m2 = to_grid``, ``m3 = from_grid``). The grid
    values ``[B, G, C]`` are never held whole. The map is bilinear, so each input's gradient is
    the same kind of product (``grad_u = m1^T ((m3^T grad) * (m2 v))``): the backward calls this
    function again, and double backward (conservative forces in training) comes for free."""

    @staticmethod
    @under_autocast
    def forward(ctx, u, v, m1, m2, m3):  # u, v [B, K_in, C]; m1, m2 [G, K_in]; m3 [K_out, G]
        ctx.save_for_backward(u, v, m1, m2, m3)
        out = u.new_empty(u.shape[0], m3.shape[0], u.shape[2])
        for rows in _row_chunks(u.shape[0], m1.shape[0] * u.shape[2]):
            torch.matmul(m3, (m1 @ u[rows]).mul_(m2 @ v[rows]), out=out[rows])
        return out

    @staticmethod
    @under_autocast
    def backward(ctx, grad_out):  # [B, K_out, C]
        u, v, m1, m2, m3 = ctx.saved_tensors
        grad_u = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_u = _GridProduct.apply(grad_out, v, m3.T, m2, m1.T)
        if ctx.needs_input_grad[1]:
            grad_v = _GridProduct.apply(grad_out, u, m3.T, m1, m2.T)
        return grad_u, grad_v, None, None, None


def grid_product(grid: S2Grid, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The product of the functions ``u`` and ``v`` on the grid, projected back:
    ``[B, K', C] x [B, K', C] -> [B, K', C]`` (EquiformerV3's self tensor product)."""
    to_grid = grid.to_grid_matrix.to(u.dtype)
    return _GridProduct.apply(u, v, to_grid, to_grid, grid.from_grid_matrix.to(u.dtype).T)


class S2Activation(nn.Module):
    """SiLU applied pointwise to the function on the sphere, then projected back.

    Shapes: ``x: [*, K', C] -> [*, K', C]``."""

    def __init__(self, grid: S2Grid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grid_silu(self.grid, x)


class SeparableS2Activation(nn.Module):
    """S2 activation for ``l > 0``; the scalar coefficient is replaced by SiLU of separate
    invariant inputs (EquiformerV2's separable S2 activation).

    Shapes: ``scalars: [*, C]``, ``x: [*, K', C] -> [*, K', C]``."""

    def __init__(self, grid: S2Grid) -> None:
        super().__init__()
        self.s2_act = S2Activation(grid)

    def forward(self, scalars: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _, out = self.s2_act(x).split([1, x.shape[1] - 1], dim=1)
        return torch.cat([nn.functional.silu(scalars)[:, None, :], out], dim=1)
