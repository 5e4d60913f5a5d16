"""Equivariant non-linearities."""

from __future__ import annotations

import torch
from torch import nn

from .grid import S2Grid


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
        return torch.cat([nn.functional.silu(x[:, :1]), x[:, 1:] * gates], dim=1)


class S2Activation(nn.Module):
    """SiLU applied pointwise to the function on the sphere, then projected back.

    Shapes: ``x: [*, K', C] -> [*, K', C]``."""

    def __init__(self, grid: S2Grid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.from_grid(nn.functional.silu(self.grid.to_grid(x)))


class SeparableS2Activation(nn.Module):
    """S2 activation for ``l > 0``; the scalar coefficient is replaced by SiLU of separate
    invariant inputs (EquiformerV2's separable S2 activation).

    Shapes: ``scalars: [*, C]``, ``x: [*, K', C] -> [*, K', C]``."""

    def __init__(self, grid: S2Grid) -> None:
        super().__init__()
        self.s2_act = S2Activation(grid)

    def forward(self, scalars: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.s2_act(x)
        return torch.cat([nn.functional.silu(scalars)[:, None, :], out[:, 1:]], dim=1)
