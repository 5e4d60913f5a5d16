"""Stochastic depth and dropout that respect graphs and equivariance."""

from __future__ import annotations

import torch
from torch import nn


class GraphDropPath(nn.Module):
    """Drops a residual branch for whole graphs (stochastic depth), rescaling the survivors.

    Shapes: ``x: [N, K, C]``, ``batch: [N]`` graph index of each node."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = torch.floor(keep + torch.rand(num_graphs, dtype=x.dtype, device=x.device)) / keep
        return x * mask[batch][:, None, None]

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class EquivariantDropout(nn.Module):
    """Dropout of whole channels of a node: all coefficients of a channel share one mask, or
    with ``lmax`` given, all coefficients of one degree of a channel (EquiformerV3's).

    Shapes: ``x: [N, K, C]``."""

    def __init__(self, drop_prob: float, lmax: int | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.lmax = lmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        groups = 1 if self.lmax is None else self.lmax + 1
        mask = torch.ones(x.shape[0], groups, x.shape[2], dtype=x.dtype, device=x.device)
        mask = nn.functional.dropout(mask, self.drop_prob, training=True)
        if self.lmax is not None:  # [N, lmax+1, C] -> [N, K, C]
            repeats = torch.tensor([2 * l + 1 for l in range(self.lmax + 1)], device=x.device)
            mask = mask.repeat_interleave(repeats, dim=1)
        return x * mask

    def extra_repr(self) -> str:
        per = "channel" if self.lmax is None else f"degree and channel (lmax={self.lmax})"
        return f"drop_prob={self.drop_prob}, one mask per {per}"
