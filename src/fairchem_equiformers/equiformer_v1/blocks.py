"""Equiformer's node embeddings, feed-forward network and pre-norm transformer block.

Shape symbols: N nodes, E edges, B graphs, D = ``irreps.dim`` of the named irreps.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from fairchem_equiformers.primitives import (
    DepthwiseTensorProduct,
    GraphDropPath,
    IrrepsLayerNorm,
    RadialMLP,
    gate_activation,
)

from .attention import EdgeFeatures, EquivariantGraphAttention


class EdgeDegreeEmbedding(nn.Module):
    """Initial features from the neighbourhood: for each edge, the radial MLP weights every degree
    of the edge's spherical harmonics per channel; a linear layer maps them to the node irreps and
    they are summed on the target, divided by ``sqrt(avg_degree)``.

    The reference feeds a learned constant vector (the same for every atom) through a depthwise
    tensor product with all of ``irreps_node``; only its scalar channels are non-zero, so here the
    product starts from ``C x 0e`` ones (C = scalar channels of ``irreps_node``), the same function
    without the weights that only ever multiply zeros.

    Shapes: ``-> [N, irreps_node.dim]``."""

    def __init__(
        self, irreps_node: o3.Irreps, irreps_sh: o3.Irreps, radial_channels: list[int], avg_degree: float
    ) -> None:
        super().__init__()
        scalars = sum(mul for mul, ir in irreps_node if ir.l == 0 and ir.p == 1)
        self.irreps_scalars = o3.Irreps(f"{scalars}x0e")
        self.tensor_product = DepthwiseTensorProduct(
            self.irreps_scalars, irreps_sh, irreps_node, shared_weights=False
        )
        self.radial = RadialMLP([*radial_channels, self.tensor_product.weight_numel])
        self.projection = o3.Linear(self.tensor_product.irreps_out, irreps_node, biases=True)
        self.avg_degree = avg_degree

    def forward(self, edges: EdgeFeatures) -> torch.Tensor:
        ones = edges.sh.new_ones(edges.sh.shape[0], self.irreps_scalars.dim)  # [E, C]
        edge_features = self.tensor_product(ones, edges.sh, self.radial(edges.radial))
        edge_features = self.projection(edge_features)  # [E, D_node]
        out = edge_features.new_zeros(edges.num_nodes, edge_features.shape[1])
        return out.index_add_(0, edges.target, edge_features) / math.sqrt(self.avg_degree)


class FeedForward(nn.Module):
    """Linear -> gate -> linear on irreps (biases on even scalars).

    Shapes: ``[N, irreps_in.dim] -> [N, irreps_out.dim]``."""

    def __init__(self, irreps_in: o3.Irreps, irreps_hidden: o3.Irreps, irreps_out: o3.Irreps) -> None:
        super().__init__()
        self.gate = gate_activation(irreps_hidden)
        self.linear_in = o3.Linear(irreps_in, self.gate.irreps_in, biases=True)
        self.linear_out = o3.Linear(self.gate.irreps_out, irreps_out, biases=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.gate(self.linear_in(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + ffn(norm(x))`` with graph
    drop-path on both branches. When ``irreps_out`` differs from ``irreps_in`` (the last block)
    the second residual goes through a linear layer.

    Shapes: ``x: [N, irreps_in.dim] -> [N, irreps_out.dim]``, ``batch: [N]``."""

    def __init__(
        self,
        attention: EquivariantGraphAttention,
        irreps_in: o3.Irreps,
        irreps_hidden: o3.Irreps,
        irreps_out: o3.Irreps,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        self.norm_1 = IrrepsLayerNorm(irreps_in)
        self.attention = attention
        self.norm_2 = IrrepsLayerNorm(irreps_in)
        self.ffn = FeedForward(irreps_in, irreps_hidden, irreps_out)
        self.shortcut = o3.Linear(irreps_in, irreps_out, biases=True) if irreps_in != irreps_out else None
        self.drop_path = GraphDropPath(drop_path_rate)

    def _dropped(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        return self.drop_path(x[:, None, :], batch, num_graphs)[:, 0, :]

    def forward(
        self, x: torch.Tensor, edges: EdgeFeatures, batch: torch.Tensor, num_graphs: int
    ) -> torch.Tensor:
        x = x + self._dropped(self.attention(self.norm_1(x), edges), batch, num_graphs)
        update = self._dropped(self.ffn(self.norm_2(x)), batch, num_graphs)
        return (x if self.shortcut is None else self.shortcut(x)) + update
