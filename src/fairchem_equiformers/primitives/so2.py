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

from .layout import SphericalLayout
from .radial import RadialMLP


class SO2OrderLinear(nn.Module):
    """The complex linear map of one order ``m > 0``: ``(W_r + i W_i)(x_{+m} + i x_{-m})``.

    ``fc`` holds ``[W_r; W_i]`` (the released checkpoints' layout). The map is applied as one
    real matmul with ``[[W_r, -W_i], [W_i, W_r]]`` on ``[x_{+m}, x_{-m}]``: the same multiply-adds
    as ``fc`` on both rows, and the output comes out in place, with no recombination of four
    partial products and no concatenation in either pass.

    Shapes: ``x: [E, 2, D * C_in]`` (rows +m, -m; D = lmax - m + 1 degrees)
    -> ``[E, 2 * D, C_out]`` (+m degrees, then -m degrees)."""

    def __init__(self, num_degrees: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.num_degrees = num_degrees
        self.out_channels = out_channels
        self.fc = nn.Linear(num_degrees * in_channels, 2 * num_degrees * out_channels, bias=False)

    def block_weight(self) -> torch.Tensor:
        """``[[W_r, -W_i], [W_i, W_r]]``: ``[2 * D * C_out, 2 * D * C_in]``."""
        w_real, w_imag = self.fc.weight.chunk(2, dim=0)  # [D * C_out, D * C_in] each
        return torch.cat([torch.cat([w_real, -w_imag], 1), torch.cat([w_imag, w_real], 1)])

    def forward(self, x: torch.Tensor, block_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``block_weight``: this module's :meth:`block_weight`, when the caller built it once
        for several calls."""
        if block_weight is None:
            block_weight = self.block_weight()
        y = nn.functional.linear(x.flatten(1), block_weight)  # [E, 2 * D * C_out]
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

    def block_weights(self) -> list[torch.Tensor]:
        """The ``m > 0`` maps' block weights, to build once for several calls of :meth:`forward`
        on chunks of edges."""
        return [conv.block_weight() for conv in self.so2_m_conv]

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        edge_scalars: torch.Tensor | None = None,
        block_weights: list[torch.Tensor] | None = None,
    ):
        orders = x.split(self.layout.order_rows, dim=1) if isinstance(x, torch.Tensor) else x
        num_edges = orders[0].shape[0]
        if block_weights is None:
            block_weights = self.block_weights()
        sizes = self.layout.order_sizes
        weights = None
        if self.rad_func is not None:
            weights = self.rad_func(edge_scalars).split(self.radial_widths, dim=1)

        x_0 = orders[0].reshape(num_edges, sizes[0] * self.in_channels)  # [E, (lmax+1) * C_in]
        if weights is not None:
            x_0 = x_0 * weights[0]
        y_0 = self.fc_m0(x_0)
        extra, y_0 = y_0.split([self.extra_m0_channels, y_0.shape[1] - self.extra_m0_channels], 1)
        outputs = [y_0.view(num_edges, sizes[0], self.out_channels)]

        for m in range(1, self.layout.mmax + 1):
            x_m = orders[m].reshape(num_edges, 2, sizes[m] * self.in_channels)  # [E, 2, D * C_in]
            if weights is not None:
                x_m = x_m * weights[m][:, None, :]
            outputs.append(self.so2_m_conv[m - 1](x_m, block_weights[m - 1]))
        out = torch.cat(outputs, dim=1)  # [E, K_e, C_out]
        return (out, extra) if self.extra_m0_channels else out
