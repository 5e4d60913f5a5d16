"""EquiformerV3's SO(2) linear map in the edge frame: the eSCN convolution without a radial
function inside (V3 weights the node features per degree before the rotation instead).

Parameter names follow the official checkpoints (``fc_m0``, ``so2_m_linear.{m-1}.fc``); the
maps of the orders ``m > 0`` are the package's three-matmul complex linear (``SO2OrderLinear``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fairchem_equiformers.primitives import SphericalLayout
from fairchem_equiformers.primitives._so2 import SO2OrderLinear


class SO2Linear(nn.Module):
    """Shapes: ``[E, K_e, C_in]``, or the edge layout split into its orders (``SphericalLayout.order_rows``):
    ``[E, lmax+1, C_in]`` for m = 0, ``[E, 2 * (lmax-m+1), C_in]`` (+m rows, then -m) for each
    m > 0 -> ``[E, K_e, C_out]``, and ``[E, extra_m0_channels]`` invariants when asked for
    (attention logits and gates, computed by the m = 0 map)."""

    def __init__(
        self, layout: SphericalLayout, in_channels: int, out_channels: int, extra_m0_channels: int = 0
    ):
        super().__init__()
        self.layout, self.in_channels, self.out_channels = layout, in_channels, out_channels
        self.extra_m0_channels = extra_m0_channels
        sizes = layout.order_sizes
        self.fc_m0 = nn.Linear(sizes[0] * in_channels, sizes[0] * out_channels + extra_m0_channels)
        self.so2_m_linear = nn.ModuleList(
            SO2OrderLinear(sizes[m], in_channels, out_channels) for m in range(1, layout.mmax + 1)
        )
        for order in self.so2_m_linear:  # the official initialisation
            order.fc.weight.data.mul_(1 / math.sqrt(2))

    def forward(self, orders: torch.Tensor | Sequence[torch.Tensor]):
        if isinstance(orders, torch.Tensor):  # [E, K_e, C_in]
            orders = orders.split(self.layout.order_rows, dim=1)
        num_edges, sizes = orders[0].shape[0], self.layout.order_sizes
        y_0 = self.fc_m0(orders[0].reshape(num_edges, sizes[0] * self.in_channels))
        extra, y_0 = y_0.split([self.extra_m0_channels, y_0.shape[1] - self.extra_m0_channels], dim=1)
        outputs = [y_0.view(num_edges, sizes[0], self.out_channels)]
        for order, x_m, size in zip(self.so2_m_linear, orders[1:], sizes[1:]):
            outputs.append(order(x_m.reshape(num_edges, 2, size * self.in_channels)))
        out = torch.cat(outputs, dim=1)  # [E, K_e, C_out]
        return (out, extra) if self.extra_m0_channels else out
