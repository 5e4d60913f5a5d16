"""SO(2) convolution in the edge frame (eSCN, Passaro & Zitnick 2023).

Once a feature is rotated so that the edge lies on the polar axis, an SO(3)-equivariant
convolution reduces to independent linear maps per order m: a real map for ``m = 0`` and a
complex-valued one (a pair of real maps mixing ``+m`` and ``-m``) for each ``m > 0``. Degrees
are mixed freely within an order. Parameter names follow the released EquiformerV2 checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._autocast import autocast_dtype, under_autocast
from ._layout import SphericalLayout
from ._radial import RadialMLP


class _ComplexLinear(torch.autograd.Function):
    """``(W_r + i W_i)(x_r + i x_i)`` with three real matmuls instead of four (Gauss):
    ``t1 = x_r W_r``, ``t2 = x_i W_i``, ``t3 = (x_r + x_i)(W_r + W_i)``; real part ``t1 - t2``,
    imaginary part ``t3 - t1 - t2``. The backward needs three matmuls per gradient as well
    (three for ``x``, three for the weights). Double backward works: with a graph requested the
    backward is made of differentiable operations."""

    @staticmethod
    @under_autocast
    def forward(ctx, x, w_real, w_imag, w_sum):  # x [E, 2, K]; w_* [N, K] (w_sum = w_real + w_imag)
        ctx.save_for_backward(x, w_real, w_imag, w_sum)
        x_real, x_imag = x.unbind(1)  # [E, K] each
        t1 = x_real @ w_real.T  # [E, N]
        t2 = x_imag @ w_imag.T
        if torch.compiler.is_compiling():  # the same values, without writes into strided views
            t3 = (x_real + x_imag) @ w_sum.T
            return torch.stack([t1 - t2, t3 - t1 - t2], dim=1)
        out = x.new_empty(x.shape[0], 2, w_real.shape[0])
        torch.mm(x_real + x_imag, w_sum.T, out=out[:, 1])
        out[:, 1].sub_(t1).sub_(t2)
        torch.sub(t1, t2, out=out[:, 0])
        return out  # [E, 2, N]

    @staticmethod
    @under_autocast
    def backward(ctx, grad_out):  # [E, 2, N]
        x, w_real, w_imag, w_sum = ctx.saved_tensors
        needs_x, needs_real, needs_imag, needs_sum = ctx.needs_input_grad
        x_real, x_imag = x.unbind(1)
        g_real, g_imag = grad_out.unbind(1)
        grad_t1 = g_real - g_imag  # dL/dt1; dL/dt2 = -(g_real + g_imag); dL/dt3 = g_imag
        minus_grad_t2 = g_real + g_imag
        grad_x = grad_w_real = grad_w_imag = grad_w_sum = None
        if needs_x:
            shared = g_imag @ w_sum  # [E, K]
            if torch.is_grad_enabled():
                grad_x = torch.stack([shared + grad_t1 @ w_real, shared - minus_grad_t2 @ w_imag], 1)
            else:
                grad_x = torch.empty_like(x)
                torch.addmm(shared, grad_t1, w_real, out=grad_x[:, 0])
                torch.addmm(shared, minus_grad_t2, w_imag, alpha=-1, out=grad_x[:, 1])
        if needs_real:
            grad_w_real = grad_t1.T @ x_real  # [N, K]
        if needs_imag:
            grad_w_imag = -(minus_grad_t2.T @ x_imag)
        if needs_sum:  # x_r + x_i again rather than an [E, K] tensor kept from the forward
            grad_w_sum = g_imag.T @ (x_real + x_imag)
        return grad_x, grad_w_real, grad_w_imag, grad_w_sum


def complex_linear(
    x: torch.Tensor, w_real: torch.Tensor, w_imag: torch.Tensor, w_sum: torch.Tensor
) -> torch.Tensor:
    """``(W_r + i W_i)(x_r + i x_i)``: ``x [E, 2, K]`` (real, imaginary rows), ``w_* [N, K]``
    (``w_sum = w_real + w_imag``) -> ``[E, 2, N]``. In float32 and float64 three real matmuls
    (:class:`_ComplexLinear`); in half precision one matmul with the real form
    ``[[W_r, -W_i], [W_i, W_r]]`` (Gauss's ``t3 - t1 - t2`` would cancel digits that bf16 does
    not have)."""
    if autocast_dtype(x) is None:
        return _ComplexLinear.apply(x, w_real, w_imag, w_sum)
    w = torch.cat([torch.cat([w_real, -w_imag], dim=1), torch.cat([w_imag, w_real], dim=1)])  # [2N, 2K]
    return (x.flatten(1) @ w.T).view(x.shape[0], 2, w_real.shape[0])


class SO2OrderLinear(nn.Module):
    """The complex linear map of one order ``m > 0``: ``(W_r + i W_i)(x_{+m} + i x_{-m})``.

    ``fc`` holds ``[W_r; W_i]`` (the released checkpoints' layout). The map costs three real
    matmuls, not four (:class:`_ComplexLinear`).

    Shapes: ``x: [E, 2, D * C_in]`` (rows +m, -m; D = lmax - m + 1 degrees)
    -> ``[E, 2 * D, C_out]`` (+m degrees, then -m degrees)."""

    def __init__(self, num_degrees: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.num_degrees = num_degrees
        self.out_channels = out_channels
        self.fc = nn.Linear(num_degrees * in_channels, 2 * num_degrees * out_channels, bias=False)

    def complex_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``W_r, W_i, W_r + W_i``: ``[D * C_out, D * C_in]`` each."""
        w_real, w_imag = self.fc.weight.chunk(2, dim=0)
        return w_real, w_imag, w_real + w_imag

    def forward(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``weights``: this module's :meth:`complex_weights`, when the caller built them once
        for several calls."""
        if weights is None:
            weights = self.complex_weights()
        y = complex_linear(x, *weights)  # [E, 2, D * C_out]
        return y.view(x.shape[0], 2 * self.num_degrees, self.out_channels)


class SO2Convolution(nn.Module):
    """SO(2) convolution over all orders ``m <= mmax``, optionally weighted per edge.

    ``radial_channels`` (e.g. ``[F, hidden, hidden]``) adds a radial MLP that maps edge
    scalars ``[E, F]`` to one weight per (order, degree, input channel), shared by ``+m`` and
    ``-m``. ``extra_m0_channels`` adds invariant outputs computed with the ``m = 0`` map
    (used for attention logits and gates).

    Shapes: ``x: [E, K_e, C_in]`` (edge layout; or already split into its orders, see
    :attr:`SphericalLayout.order_rows`) -> ``[E, K_e, C_out]`` and, if requested,
    ``[E, extra_m0_channels]``.
    """

    def __init__(
        self,
        layout: SphericalLayout,
        in_channels: int,
        out_channels: int,
        radial_channels: list[int] | None = None,
        extra_m0_channels: int = 0,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.extra_m0_channels = extra_m0_channels
        sizes = layout.order_sizes  # degrees per order
        self.fc_m0 = nn.Linear(sizes[0] * in_channels, sizes[0] * out_channels + extra_m0_channels)
        self.so2_m_conv = nn.ModuleList(
            SO2OrderLinear(sizes[m], in_channels, out_channels) for m in range(1, layout.mmax + 1)
        )
        self.radial_widths = [d * in_channels for d in sizes]
        self.rad_func = None
        if radial_channels is not None:
            self.rad_func = RadialMLP([*radial_channels, sum(self.radial_widths)])

    def order_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """The ``m > 0`` maps' :meth:`SO2OrderLinear.complex_weights`, to build once for several
        calls of :meth:`forward` on chunks of edges."""
        return [conv.complex_weights() for conv in self.so2_m_conv]

    def _order_inputs(
        self, x: torch.Tensor | Sequence[torch.Tensor], edge_scalars: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Each order's input rows flattened (and weighted by the radial MLP, if any):
        ``[E, (lmax+1) * C_in]`` for m = 0, ``[E, 2, D * C_in]`` (+m, -m) for m > 0."""
        orders = x.split(self.layout.order_rows, dim=1) if isinstance(x, torch.Tensor) else x
        num_edges = orders[0].shape[0]
        sizes = self.layout.order_sizes
        inputs = [orders[0].reshape(num_edges, sizes[0] * self.in_channels)]
        inputs += [orders[m].reshape(num_edges, 2, sizes[m] * self.in_channels) for m in range(1, len(sizes))]
        if self.rad_func is not None:
            weights = self.rad_func(edge_scalars).split(self.radial_widths, dim=1)
            inputs = [inputs[0] * weights[0]] + [x * w[:, None, :] for x, w in zip(inputs[1:], weights[1:])]
        return inputs

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        edge_scalars: torch.Tensor | None = None,
        order_weights: list[tuple[torch.Tensor, ...]] | None = None,
    ):
        inputs = self._order_inputs(x, edge_scalars)
        num_edges = inputs[0].shape[0]
        if order_weights is None:
            order_weights = self.order_weights()
        y_0 = self.fc_m0(inputs[0])
        extra, y_0 = y_0.split([self.extra_m0_channels, y_0.shape[1] - self.extra_m0_channels], 1)
        outputs = [y_0.view(num_edges, self.layout.order_sizes[0], self.out_channels)]
        for conv, x_m, weights in zip(self.so2_m_conv, inputs[1:], order_weights):
            outputs.append(conv(x_m, weights))
        out = torch.cat(outputs, dim=1)  # [E, K_e, C_out]
        return (out, extra) if self.extra_m0_channels else out

    def forward_degree(
        self, x: torch.Tensor | Sequence[torch.Tensor], degree: int, edge_scalars: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Only the outputs of one degree, ``[E, 2 * min(degree, mmax) + 1, C_out]`` (rows
        :meth:`SphericalLayout.degree_edge_rows`): the values of those rows of :meth:`forward`,
        with only the weight rows that produce them (a head that reads one degree skips the
        rest of the convolution)."""
        inputs = self._order_inputs(x, edge_scalars)
        c_out, start = self.out_channels, self.extra_m0_channels + degree * self.out_channels
        weight, bias = self.fc_m0.weight[start : start + c_out], self.fc_m0.bias[start : start + c_out]
        outputs = [nn.functional.linear(inputs[0], weight, bias)[:, None]]  # [E, 1, C_out]
        for m in range(1, min(degree, self.layout.mmax) + 1):
            start = (degree - m) * c_out  # degree l is the (l - m)-th degree of order m
            w_real, w_imag = (w[start : start + c_out] for w in self.so2_m_conv[m - 1].fc.weight.chunk(2))
            outputs.append(complex_linear(inputs[m], w_real, w_imag, w_real + w_imag))  # [E, 2, C_out]
        return torch.cat(outputs, dim=1)
