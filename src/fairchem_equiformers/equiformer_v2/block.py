"""Edge-degree embedding and the pre-norm transformer block of EquiformerV2."""

from __future__ import annotations

import torch
from torch import nn

from fairchem_equiformers.primitives import (
    EquivariantDropout,
    GraphDropPath,
    RadialMLP,
    equivariant_norm,
)

from .attention import EdgeContext, SO2GraphAttention, attach_element_embeddings, with_element_embeddings
from .feed_forward import FeedForward


class EdgeDegreeEmbedding(nn.Module):
    """Initial equivariant node features from the node's edges.

    A radial MLP gives the ``m = 0`` coefficients of every degree in each edge's frame; rotated
    back and summed over the target's edges, divided by ``avg_degree``.

    Shapes: ``-> [N, K, C]``."""

    def __init__(
        self,
        lmax: int,
        sphere_channels: int,
        max_num_elements: int,
        radial_channels: list[int],
        use_atom_edge_embedding: bool,
        avg_degree: float,
    ) -> None:
        super().__init__()
        self.lmax = lmax
        self.sphere_channels = sphere_channels
        self.avg_degree = avg_degree
        radial_channels = attach_element_embeddings(
            self, use_atom_edge_embedding, max_num_elements, radial_channels
        )
        self.rad_func = RadialMLP([*radial_channels, (lmax + 1) * sphere_channels])

    def forward(self, edges: EdgeContext) -> torch.Tensor:
        edge_scalars = with_element_embeddings(
            edges.edge_scalars, self.source_embedding, self.target_embedding, edges
        )
        m0 = self.rad_func(edge_scalars).view(-1, self.lmax + 1, self.sphere_channels)  # [E, lmax+1, C]
        per_edge = edges.rotation.from_edge_m0(m0)  # [E, K, C]
        out = per_edge.new_zeros(edges.num_nodes, per_edge.shape[1], per_edge.shape[2])
        out.index_add_(0, edges.edge_index[1], per_edge)
        return out / self.avg_degree


class TransformerBlock(nn.Module):
    """``x + attention(norm(x))`` then ``x + ffn(norm(x))``, each branch with graph drop-path
    and channel dropout.

    Shapes: ``x: [N, K, C] -> [N, K, C]``."""

    def __init__(
        self,
        attention: SO2GraphAttention,
        ffn: FeedForward,
        norm_type: str,
        lmax: int,
        sphere_channels: int,
        drop_path_rate: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.norm_1 = equivariant_norm(norm_type, lmax, sphere_channels)
        self.ga = attention
        self.norm_2 = equivariant_norm(norm_type, lmax, sphere_channels)
        self.ffn = ffn
        self.drop_path = GraphDropPath(drop_path_rate) if drop_path_rate > 0 else None
        self.proj_drop = EquivariantDropout(proj_drop) if proj_drop > 0 else None

    def _residual_branch(self, out: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        if self.drop_path is not None:
            out = self.drop_path(out, batch, num_graphs)
        if self.proj_drop is not None:
            out = self.proj_drop(out)
        return out

    def forward(
        self, x: torch.Tensor, edges: EdgeContext, batch: torch.Tensor, num_graphs: int
    ) -> torch.Tensor:
        x = x + self._residual_branch(self.ga(self.norm_1(x), edges), batch, num_graphs)
        return x + self._residual_branch(self.ffn(self.norm_2(x)), batch, num_graphs)
