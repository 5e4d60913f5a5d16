"""Cluster attention: atoms pooled into a few soft clusters per graph that attend to each other,
so information travels across a whole structure in one step, beyond the cutoff.

Design: each atom's scalars give a softmax over ``M`` clusters (``assign: [N, M]``, invariant).
A cluster's feature is the assignment-weighted sum of its graph's atom features divided by the
number of atoms (``[B, M, K, C]``: equivariant, since the weights are invariant; positions are
not used, so it is translation invariant). The ``M`` clusters of a graph attend to each other
with scalar query-key attention (standard softmax attention over a graph's clusters, evaluated by
``scaled_dot_product_attention``) on SO3-linear values; each atom receives the
assignment-weighted sum of the updated clusters through an SO3 linear map, as a residual.
Smooth, permutation invariant, O(N M + B M^2).
"""

from __future__ import annotations

import torch
from torch import nn

from fairchem_equiformers.primitives import SO3Linear, equivariant_norm


class ClusterAttention(nn.Module):
    """Shapes: ``x: [N, K, C] -> [N, K, C]`` (residual included)."""

    def __init__(self, lmax: int, channels: int, num_heads: int, num_clusters: int) -> None:
        super().__init__()
        self.num_heads, self.num_clusters = num_heads, num_clusters
        self.norm = equivariant_norm("rms_norm_sh", lmax, channels)
        self.assign = nn.Linear(channels, num_clusters)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = SO3Linear(channels, channels, lmax)
        self.output = SO3Linear(channels, channels, lmax)

    def forward(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        h = self.norm(x)
        n, k, c = h.shape
        m, heads = self.num_clusters, self.num_heads
        assign = torch.softmax(self.assign(h[:, 0]), dim=1)  # [N, M]
        natoms = torch.bincount(batch, minlength=num_graphs).to(h.dtype)  # [B]
        pooled = (assign[:, :, None, None] * h[:, None]).flatten(1)  # [N, M*K*C]
        clusters = pooled.new_zeros(num_graphs, m * k * c).index_add_(0, batch, pooled)
        clusters = clusters.view(num_graphs, m, k, c) / natoms[:, None, None, None]
        scalars = clusters[:, :, 0]  # [B, M, C]
        query = self.query(scalars).view(num_graphs, m, heads, -1).transpose(1, 2)  # [B, H, M, d]
        key = self.key(scalars).view(num_graphs, m, heads, -1).transpose(1, 2)
        value = self.value(clusters.view(-1, k, c)).view(num_graphs, m, k, heads, c // heads)
        value = value.permute(0, 3, 1, 2, 4).flatten(3)  # [B, H, M, K*C/H]
        mixed = nn.functional.scaled_dot_product_attention(query, key, value)  # [B, H, M, K*C/H]
        mixed = (
            mixed.view(num_graphs, heads, m, k, c // heads)
            .permute(0, 2, 3, 1, 4)
            .reshape(num_graphs, m, k, c)
        )
        received = torch.einsum("nm,nmkc->nkc", assign, mixed.index_select(0, batch))  # [N, K, C]
        return x + self.output(received)
