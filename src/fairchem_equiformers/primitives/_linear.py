"""Equivariant linear map: one weight matrix per degree, a bias on the scalars only."""

from __future__ import annotations

import math

import torch
from torch import nn


class SO3Linear(nn.Module):
    """Per-degree linear layer on node features.

    Shapes: ``x: [N, (lmax+1)**2, C_in] -> [N, (lmax+1)**2, C_out]``.
    Parameters: ``weight: [lmax+1, C_out, C_in]``, ``bias: [C_out]`` (added to l = 0)."""

    def __init__(self, in_features: int, out_features: int, lmax: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.lmax = lmax
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(lmax + 1, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one split (its backward is one concatenation, not a zero-filled tensor per degree)
        degrees = x.split([2 * l + 1 for l in range(self.lmax + 1)], dim=1)  # [N, 2l+1, C_in]
        parts = [degrees[0] @ self.weight[0].T + self.bias]
        parts += [x_l @ self.weight[l].T for l, x_l in enumerate(degrees) if l > 0]  # [N, 2l+1, C_out]
        return torch.cat(parts, dim=1)

    def forward_degree(self, x_l: torch.Tensor, degree: int) -> torch.Tensor:
        """One degree's rows: ``[N, 2l+1, C_in] -> [N, 2l+1, C_out]``."""
        out = x_l @ self.weight[degree].T
        return out + self.bias if degree == 0 else out

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, lmax={self.lmax}"
