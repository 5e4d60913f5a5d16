"""Invariant encoder in front of the equivariant blocks: a transformer over atoms whose attention
is restricted to the neighbour graph and biased by the distance."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Neighbourhood


class DistanceBiasedLayer(nn.Module):
    """Pre-norm transformer layer on atom scalars: ``s + attn(LN(s))``, ``s + FFN(LN(s))``.

    Attention of atom i over its edges (plus the zero sink of ``Neighbourhood``) with logits
    ``q_i . k_j / sqrt(d) + b_h(distance) + log envelope``: standard softmax attention with an
    additive mask, evaluated by ``scaled_dot_product_attention`` on the padded edge slots.

    Shapes: ``s: [N, C] -> [N, C]``."""

    def __init__(self, channels: int, num_heads: int, num_basis: int, hidden_channels: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_1 = nn.LayerNorm(channels)
        self.query_key_value = nn.Linear(channels, 3 * channels)
        self.distance_bias = nn.Linear(num_basis, num_heads)
        self.output = nn.Linear(channels, channels)
        self.norm_2 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, hidden_channels), nn.SiLU(), nn.Linear(hidden_channels, channels)
        )

    def forward(self, s: torch.Tensor, geometry: Neighbourhood) -> torch.Tensor:
        n, c = s.shape
        heads, d = self.num_heads, c // self.num_heads
        query, key, value = self.query_key_value(self.norm_1(s)).chunk(3, dim=1)  # [N, C] each
        source = geometry.edge_source
        key = geometry.padded(key.index_select(0, source).view(-1, heads, d)).transpose(
            1, 2
        )  # [N, H, 1+D, d]
        value = geometry.padded(value.index_select(0, source).view(-1, heads, d)).transpose(1, 2)
        bias = geometry.padded(self.distance_bias(geometry.distance_basis))  # [N, 1+D, H]
        bias = bias.permute(0, 2, 1)[:, :, None, :] + geometry.slot_bias[:, None, None, :]  # [N, H, 1, 1+D]
        out = nn.functional.scaled_dot_product_attention(
            query.view(n, heads, 1, d), key, value, attn_mask=bias
        )
        s = s + self.output(out.reshape(n, c))
        return s + self.ffn(self.norm_2(s))


class DistanceBiasedEncoder(nn.Module):
    """``num_layers`` :class:`DistanceBiasedLayer` blocks. Shapes: ``s: [N, C] -> [N, C]``."""

    def __init__(
        self, channels: int, num_heads: int, num_layers: int, num_basis: int, hidden_channels: int
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"sphere channels {channels} are not divisible by num_heads={num_heads}")
        self.layers = nn.ModuleList(
            DistanceBiasedLayer(channels, num_heads, num_basis, hidden_channels) for _ in range(num_layers)
        )

    def forward(self, s: torch.Tensor, geometry: Neighbourhood) -> torch.Tensor:
        for layer in self.layers:
            s = layer(s, geometry)
        return s
