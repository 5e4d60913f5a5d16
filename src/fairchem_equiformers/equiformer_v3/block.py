"""EquiformerV3's edge-degree embedding and pre-norm transformer block."""

from __future__ import annotations

import torch
from torch import nn

from fairchem_equiformers.primitives import EquivariantDropout, GraphDropPath, RadialMLP, equivariant_norm

from .attention import EdgesV3, EquivariantGraphAttention, radial_input_channels
from .feed_forward import FeedForwardV3

# EquiformerV3's norm types and the package's norms computing them (see ``primitives``).
NORM_TYPES = {
    "equivariant_layer_norm": "layer_norm",
    "sep_layer_norm": "layer_norm_sh",
    "merge_layer_norm": "rms_norm_sh",
    "merge_layer_norm_attn_rms_norm": "rms_norm_sh",  # and RMSNorm on the attention logits
    "merge_rms_norm": "rms_norm_sh_uncentred",
}


def norm_v3(norm_type: str, lmax: int, channels: int) -> nn.Module:
    return equivariant_norm(NORM_TYPES[norm_type], lmax, channels)


class EdgeDegreeEmbedding(nn.Module):
    """Initial features from each node's edges: a radial function (of the distance and the two
    elements) gives every degree's ``m = 0`` coefficient in the edge frame, scaled by the
    envelope, rotated back and summed over the target's edges, divided by ``avg_degree``.

    Shapes: ``-> [N, K, C]``."""

    def __init__(
        self,
        lmax: int,
        channels: int,
        max_num_elements: int,
        num_radial_basis: int,
        edge_channels: int,
        use_atom_edge_embedding: bool,
        avg_degree: float,
    ) -> None:
        super().__init__()
        self.lmax, self.channels, self.avg_degree = lmax, channels, avg_degree
        if use_atom_edge_embedding:
            self.source_embedding = nn.Embedding(max_num_elements, edge_channels)
            self.target_embedding = nn.Embedding(max_num_elements, edge_channels)
            nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
            nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
        else:
            self.source_embedding = self.target_embedding = None
        radial_in = radial_input_channels(num_radial_basis, edge_channels, use_atom_edge_embedding)
        self.rad_func = RadialMLP([radial_in, edge_channels, edge_channels, (lmax + 1) * channels])

    def forward(self, edges: EdgesV3) -> torch.Tensor:
        edge_input = edges.edge_scalars
        if self.source_embedding is not None:
            edge_input = torch.cat(
                [edge_input, self.source_embedding(edges.source_z), self.target_embedding(edges.target_z)],
                dim=1,
            )
        m0 = self.rad_func(edge_input)  # [E, (lmax+1) * C]
        if edges.envelope is not None:
            m0 = m0 * edges.envelope
        per_edge = edges.rotation.from_edge_m0(m0.view(-1, self.lmax + 1, self.channels))  # [E, K, C]
        out = per_edge.new_zeros(edges.num_nodes, *per_edge.shape[1:]).index_add_(
            0, edges.edge_index[1], per_edge
        )
        return out / self.avg_degree


class TransformerBlockV3(nn.Module):
    """``x + attention(norm(x))`` then ``x + ffn(norm(x))``, each branch with graph drop-path
    and dropout of whole degrees of channels (``proj_drop``).

    Shapes: ``x: [N, K, C] -> [N, K, C]``."""

    def __init__(
        self,
        attention: EquivariantGraphAttention,
        ffn: FeedForwardV3,
        norm_type: str,
        lmax: int,
        channels: int,
        drop_path_rate: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.norm_1 = norm_v3(norm_type, lmax, channels)
        self.ga = attention
        self.drop_path = GraphDropPath(drop_path_rate) if drop_path_rate > 0 else None
        self.proj_drop = EquivariantDropout(proj_drop, lmax) if proj_drop > 0 else None
        self.norm_2 = norm_v3(norm_type, lmax, channels)
        self.ffn = ffn

    def _branch(self, out: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        if self.drop_path is not None:
            out = self.drop_path(out, batch, num_graphs)
        return out if self.proj_drop is None else self.proj_drop(out)

    def forward(self, x: torch.Tensor, edges: EdgesV3, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        x = x + self._branch(self.ga(self.norm_1(x), edges), batch, num_graphs)
        return x + self._branch(self.ffn(self.norm_2(x)), batch, num_graphs)
