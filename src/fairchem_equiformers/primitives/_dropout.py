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
    """Dropout of whole channels of a node (all coefficients of a channel share one mask).

    Shapes: ``x: [N, K, C]``."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        mask = torch.ones(x.shape[0], 1, x.shape[2], dtype=x.dtype, device=x.device)
        return x * nn.functional.dropout(mask, self.drop_prob, training=True)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
