"""EquiformerV3's equivariant graph attention (the blocks' attention and the direct force head).

Per edge: the source and target features are weighted per degree by a radial function of the
distance and the two elements, merged (side by side, or added with ``use_add_merge``), rotated
into the edge frame (truncated at ``mmax``), mapped by an SO(2) linear map that also gives the
attention logits and the activation's invariants, passed through the activation, mapped again
to the value heads, weighted by the attention (softmax over each target's edges, scaled by the
envelope), rotated back and summed into the target.

The per-degree radial weights are applied after the rotation here (before it in the official
code): a rotation never mixes degrees, so both orders give the same function. Parameter names
follow the official checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fairchem_equiformers.primitives import (
    EdgeRotation,
    RadialMLP,
    S2Grid,
    SmoothLeakyReLU,
    SO3Linear,
    SphericalLayout,
    accumulation_dtype,
)

from .activations import check_activation, halves_channels, has_scalars, make_activation
from .so2 import SO2Linear


@dataclass
class EdgesV3:
    """What every attention of one forward pass shares: the graph and per-edge quantities."""

    edge_index: torch.Tensor  # [2, E] source, target
    edge_scalars: torch.Tensor  # [E, num_radial_basis] Gaussian basis of the distance
    source_z: torch.Tensor  # [E]
    target_z: torch.Tensor  # [E]
    rotation: EdgeRotation
    envelope: torch.Tensor | None  # [E, 1], or None without use_envelope
    num_nodes: int


def envelope_softmax(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_nodes: int,
    envelope: torch.Tensor | None,
    eps: float,
    softcap: float | None,
    mask_rate: float,
    training: bool,
) -> torch.Tensor:
    """Softmax of ``logits: [E, H]`` over the edges of each target node, each exponential
    scaled by the edge's ``envelope [E, 1]`` (a neighbour at the cutoff has no weight) and, in
    training, dropped with probability ``mask_rate`` (survivors rescaled); ``eps`` is added to
    each node's sum. ``softcap``: logits squashed to ``(-softcap, softcap)`` by tanh first.
    Half-precision logits (autocast) are cast to float32 first."""
    logits = logits.to(accumulation_dtype(logits))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    index = target[:, None].expand_as(logits)
    node_max = logits.new_full((num_nodes, logits.shape[1]), float("-inf"))
    node_max = node_max.scatter_reduce(0, index, logits.detach(), "amax", include_self=True)
    exp = torch.exp(logits - node_max.index_select(0, target))  # [E, H]
    if envelope is not None:
        exp = exp * envelope
    if mask_rate > 0.0:
        exp = nn.functional.dropout(exp, mask_rate, training)
    node_sum = exp.new_zeros((num_nodes, logits.shape[1])).index_add_(0, target, exp) + eps
    return exp / node_sum.index_select(0, target)


def radial_input_channels(num_radial_basis: int, edge_channels: int, use_atom_edge_embedding: bool) -> int:
    return num_radial_basis + (2 * edge_channels if use_atom_edge_embedding else 0)


class EquivariantGraphAttention(nn.Module):
    """Shapes: ``x: [N, K, C_in]`` -> ``[N, K, C_out]``.

    ``rms_alpha_norm``: the logits' normalisation is an RMSNorm (the official ``*rms_norm*``
    norm types replace it, whatever ``use_attn_renorm`` says); otherwise a LayerNorm, or none
    without ``use_attn_renorm``."""

    def __init__(
        self,
        layout: SphericalLayout,
        grid: S2Grid,
        in_channels: int,
        hidden_channels: int,
        num_heads: int,
        alpha_channels: int,
        value_channels: int,
        out_channels: int,
        max_num_elements: int,
        num_radial_basis: int,
        edge_channels: int,
        use_atom_edge_embedding: bool,
        activation: str,
        use_attn_renorm: bool,
        rms_alpha_norm: bool,
        use_add_merge: bool,
        use_rad_l_parametrization: bool,
        softcap: float | None,
        eps: float,
        alpha_drop: float = 0.0,
        attn_mask_rate: float = 0.0,
        attn_weights_drop: float = 0.0,
        value_drop: float = 0.0,
    ) -> None:
        super().__init__()
        check_activation(activation, "activation")
        if use_add_merge and not use_rad_l_parametrization:
            raise ValueError(
                "use_add_merge=True needs use_rad_l_parametrization=True (as in the official model)"
            )
        lmax = layout.lmax
        self.layout, self.in_channels, self.num_heads = layout, in_channels, num_heads
        self.alpha_channels, self.value_channels = alpha_channels, value_channels
        self.activation, self.use_add_merge = activation, use_add_merge
        self.use_rad_l_parametrization = use_rad_l_parametrization
        self.softcap, self.eps, self.attn_mask_rate = softcap, eps, attn_mask_rate

        if use_atom_edge_embedding:
            self.source_embedding = nn.Embedding(max_num_elements, edge_channels)
            self.target_embedding = nn.Embedding(max_num_elements, edge_channels)
            nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
            nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
        else:
            self.source_embedding = self.target_embedding = None
        if use_rad_l_parametrization:
            self.radial_rows = lmax + 1  # one weight per degree
        else:
            self.radial_rows = sum(layout.order_sizes)  # one weight per (order, degree), shared by +-m
        radial_in = radial_input_channels(num_radial_basis, edge_channels, use_atom_edge_embedding)
        self.rad_func = RadialMLP(
            [radial_in, edge_channels, edge_channels, self.radial_rows * 2 * in_channels]
        )

        hidden = 2 * hidden_channels if halves_channels(activation) else hidden_channels
        extra = num_heads * alpha_channels
        self.scalar_channels = 0
        if has_scalars(activation):
            if "gates2" in activation:
                self.scalar_channels = hidden + hidden // 2
            elif activation.startswith("sep"):
                self.scalar_channels = hidden
            else:  # gate
                self.scalar_channels = lmax * hidden
        self.so2_linear_1 = SO2Linear(
            layout, in_channels if use_add_merge else 2 * in_channels, hidden, extra + self.scalar_channels
        )
        if rms_alpha_norm:
            self.alpha_norm = nn.RMSNorm(alpha_channels, eps=1e-5)
        else:
            self.alpha_norm = nn.LayerNorm(alpha_channels) if use_attn_renorm else nn.Identity()
        self.alpha_act = nn.SiLU() if alpha_drop != 0.0 else SmoothLeakyReLU()
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop != 0.0 else nn.Identity()
        bound = 1.0 / math.sqrt(alpha_channels)
        self.alpha_dot = nn.Parameter(torch.empty(num_heads, alpha_channels).uniform_(-bound, bound))
        self.attn_weights_dropout = (
            nn.Dropout(attn_weights_drop) if attn_weights_drop != 0.0 else nn.Identity()
        )

        degrees = [l for l, _ in layout.edge_lm][1:]
        self.act = make_activation(activation, grid, degrees, lmax, value_drop)
        act_out = hidden // 2 if halves_channels(activation) else hidden
        self.so2_linear_2 = SO2Linear(layout, act_out, num_heads * value_channels)
        if "-merge" in activation:  # the official initialisation (the first rows of the m = 0 map)
            self.so2_linear_2.fc_m0.weight.data[:act_out].mul_(1.0 / math.sqrt(2.0))
        self.proj = SO3Linear(num_heads * value_channels, out_channels, lmax)

    def _order_weights(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """Radial weights ``[E, radial_rows, W]`` -> one per order group of the edge layout,
        ``[E, rows, W]`` (rows as ``SphericalLayout.order_rows``)."""
        lmax, groups = self.layout.lmax, []
        offset = 0
        for m in range(self.layout.mmax + 1):
            if self.use_rad_l_parametrization:
                w = weights[:, m : lmax + 1]  # degrees m..lmax
            else:
                w = weights[:, offset : offset + lmax + 1 - m]
                offset += lmax + 1 - m
            groups.append(w if m == 0 else torch.cat([w, w], dim=1))  # +m and -m rows share them
        return groups

    def forward(self, x: torch.Tensor, edges: EdgesV3) -> torch.Tensor:
        edge_input = edges.edge_scalars
        if self.source_embedding is not None:
            edge_input = torch.cat(
                [edge_input, self.source_embedding(edges.source_z), self.target_embedding(edges.target_z)],
                dim=1,
            )
        weights = self.rad_func(edge_input).view(-1, self.radial_rows, 2 * self.in_channels)  # [E, rows, 2C]
        # the edge layout, per order [E, rows, 2C]: source channels, then target channels
        groups = edges.rotation.gather_to_edge(x, edges.edge_index)
        weighted = []
        for group, w in zip(groups, self._order_weights(weights)):
            if self.use_add_merge:
                c = self.in_channels
                weighted.append(group[..., :c] * w[..., :c] + group[..., c:] * w[..., c:])  # [E, rows, C]
            else:
                weighted.append(group * w)  # [E, rows, 2C]
        message, invariants = self.so2_linear_1(weighted)  # [E, K_e, hidden], [E, extra + S]
        logits, scalars = invariants.split(
            [self.num_heads * self.alpha_channels, self.scalar_channels], dim=1
        )
        message = self.act(message, scalars) if self.scalar_channels else self.act(message)
        message = self.so2_linear_2(message)  # [E, K_e, H * V]

        alpha = self.alpha_norm(logits.view(logits.shape[0], self.num_heads, self.alpha_channels))
        alpha = self.alpha_dropout(self.alpha_act(alpha))
        alpha = torch.einsum("ehc,hc->eh", alpha, self.alpha_dot)  # [E, H]
        alpha = envelope_softmax(
            alpha, edges.edge_index[1], edges.num_nodes, edges.envelope, self.eps, self.softcap,
            self.attn_mask_rate, self.training,
        )  # fmt: skip
        if edges.envelope is not None:
            alpha = alpha * edges.envelope
        alpha = self.attn_weights_dropout(alpha)
        num_edges = message.shape[0]
        rows = message.shape[1]
        message = message.view(num_edges, rows, self.num_heads, self.value_channels) * alpha[:, None, :, None]
        message = edges.rotation.from_edge(
            message.view(num_edges, rows, self.num_heads * self.value_channels)
        )  # [E, K, H * V]
        message = message.to(accumulation_dtype(message))  # summed over edges in float32
        summed = message.new_zeros(edges.num_nodes, *message.shape[1:]).index_add_(
            0, edges.edge_index[1], message
        )
        return self.proj(summed)
