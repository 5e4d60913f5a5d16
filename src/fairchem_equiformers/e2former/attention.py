"""E2Former's equivariant attention: values are tensor products with solid harmonics of the edge
vector, computed per node by Wigner-6j recoupling; edges only carry attention-weighted sums."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fairchem_equiformers.primitives import (
    RadialMLP,
    SmoothLeakyReLU,
    SO3Linear,
    SolidHarmonicTensorProduct,
    graph_softmax,
)

ATTENTION_ORDERS = {
    "zero-order": (0,),
    "first-order": (1,),
    "second-order": (2,),
    "all-order": (0, 1, 2),
}
ALPHA_TYPES = ("QK", "dot", "dot_small")


@dataclass
class Neighbourhood:
    """Geometry shared by every block of one forward pass.

    Sources are *images*: distinct (atom, periodic cell offset) pairs that are the source of an
    edge. Without periodicity the images are the atoms; in a cell much larger than the cutoff
    nearly so; in a small cell their number is bounded by the number of edges.

    ``edge_image, edge_target: [E]``; ``image_atom: [S]``; ``image_pos: [S, 3]`` and
    ``node_pos: [N, 3]``: positions relative to each graph's centre divided by the cutoff;
    ``scaled_distance: [E]`` distance / cutoff; ``distance_basis: [E, num_basis]``;
    ``log_envelope: [E]`` (added to every attention logit, so an edge's weight vanishes
    smoothly at the cutoff); ``slots: [N, D]`` the edges of each target padded with ``E``
    (D = largest in-degree); ``slot_image: [N, 1 + D]`` the image of each slot of the padded
    layout (sink and padding: ``S``, a zero row); ``slot_bias: [N, 1 + D]`` the additive
    attention mask of the padded layout (0 for the sink, the log-envelope for edges, -inf for
    padding).
    """

    edge_image: torch.Tensor
    edge_target: torch.Tensor
    image_atom: torch.Tensor
    image_pos: torch.Tensor
    node_pos: torch.Tensor
    scaled_distance: torch.Tensor
    distance_basis: torch.Tensor
    log_envelope: torch.Tensor
    slots: torch.Tensor
    slot_image: torch.Tensor
    slot_bias: torch.Tensor

    @property
    def edge_source(self) -> torch.Tensor:
        return self.image_atom.index_select(0, self.edge_image)

    @property
    def num_nodes(self) -> int:
        return self.node_pos.shape[0]

    def padded(self, edge_values: torch.Tensor) -> torch.Tensor:
        return pad_edges(edge_values, self.slots)


def pad_edges(edge_values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[E, *F] -> [N, 1 + D, *F]``: slot 0 is a zero "sink", then each target's edges
    (``slots: [N, D]``, padded with ``E``), zero-padded."""
    num_nodes = slots.shape[0]
    zero = edge_values.new_zeros(1, *edge_values.shape[1:])
    per_slot = torch.cat([edge_values, zero]).index_select(0, slots.flatten())
    per_slot = per_slot.view(*slots.shape, *edge_values.shape[1:])  # [N, D, *F]
    return torch.cat([zero.expand(num_nodes, 1, *edge_values.shape[1:]), per_slot], dim=1)


def edge_slots(edge_target: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``[N, D]``: the indices of each node's incoming edges, padded with ``E``."""
    num_edges = edge_target.shape[0]
    degree = torch.bincount(edge_target, minlength=num_nodes)
    width = int(degree.max()) if num_edges else 0
    order = torch.argsort(edge_target, stable=True)
    start = torch.cumsum(degree, 0) - degree
    rank = torch.arange(num_edges, device=edge_target.device) - start[edge_target[order]]
    slots = torch.full((num_nodes, width), num_edges, dtype=torch.long, device=edge_target.device)
    slots[edge_target[order], rank] = order
    return slots


class Wigner6jAttention(nn.Module):
    """``out_i = sum_L g_L(x_i) sum_j a_ij phi_L(d_ij) [v_j (x) R^L(r_i - r_j) / d_ij^L]`` for the orders L
    of ``attn_type`` (``all-order`` mixes 0, 1 and 2 with sigmoid gates g_L of the scalars;
    a single order has no gate), then an SO3 linear projection. ``phi_L(d_ij)``: a radial MLP
    of the distance, one weight per order and channel.

    ``a_ij``: softmax over the target's edges plus a zero "sink" (logit 0, value 0), with the
    log of a smooth cutoff envelope added to the logits; so the output is continuous when an edge
    crosses the cutoff and an atom without neighbours receives zero. Per head (``num_heads``
    groups of ``C / num_heads`` channels) one weight per edge. Logits (``alpha_type``):

    * ``QK``: ``q_i . k_ij / sqrt(d)``, ``q_i`` from the target's scalars, ``k_ij`` the source's
      scalars times a linear map of the distance basis. Standard softmax attention: evaluated by
      ``torch.nn.functional.scaled_dot_product_attention``, one query per target over its padded
      edge slots (batch = N nodes, sequence = D + 1), so memory stays O(E) and fused kernels apply
      on GPU.
    * ``dot`` (Equiformer): ``alpha_h . SmoothLeakyReLU((W_t x_i + W_s x_j) * MLP(distance))``.
    * ``dot_small``: the same without the per-edge MLP: ``... SmoothLeakyReLU(W_t x_i + W_s x_j +
      W_r distance)``.

    Shapes: ``x: [N, K, C] -> [N, K, C]``."""

    def __init__(
        self,
        lmax: int,
        channels: int,
        num_heads: int,
        attn_type: str,
        alpha_type: str,
        alpha_channels: int,
        num_basis: int,
        edge_channels: int,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"sphere channels {channels} are not divisible by num_heads={num_heads}")
        self.lmax, self.channels, self.num_heads = lmax, channels, num_heads
        self.alpha_type, self.alpha_channels = alpha_type, alpha_channels
        self.value = SO3Linear(channels, channels, lmax)
        self.products = nn.ModuleList(
            SolidHarmonicTensorProduct(lmax, order, channels) for order in ATTENTION_ORDERS[attn_type]
        )
        self.order_gate = (
            nn.Linear(channels, len(self.products) * channels) if len(self.products) > 1 else None
        )
        self.radial = RadialMLP([num_basis, edge_channels, len(self.products) * channels])
        self.intermediate_sizes = [tp.num_intermediate for tp in self.products]
        orders = torch.tensor(ATTENTION_ORDERS[attn_type], dtype=torch.float64)
        self.register_buffer("orders", orders, persistent=False)
        hidden = num_heads * alpha_channels
        if alpha_type == "QK":
            self.query = nn.Linear(channels, hidden)
            self.key = nn.Linear(channels, hidden)
            self.key_radial = nn.Linear(num_basis, hidden)
        else:
            self.alpha_target = nn.Linear(channels, hidden)
            self.alpha_source = nn.Linear(channels, hidden, bias=False)
            if alpha_type == "dot":
                self.alpha_radial = RadialMLP([num_basis, edge_channels, hidden])
            else:
                self.alpha_radial = nn.Linear(num_basis, hidden, bias=False)
            self.alpha_act = SmoothLeakyReLU(0.2)
            self.alpha_dot = nn.Parameter(torch.randn(num_heads, alpha_channels) / alpha_channels**0.5)
        self.output = SO3Linear(channels, channels, lmax)

    def _intermediates(self, x: torch.Tensor, geometry: Neighbourhood) -> torch.Tensor:
        """Per-source node-level tensor products of every order, ``[S, P, C]``."""
        values = self.value(x).index_select(0, geometry.image_atom)  # [S, K, C]
        return torch.cat([tp.source_stage(values, geometry.image_pos) for tp in self.products], dim=1)

    def _by_order(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``values: [..., P, c]`` times ``weights: [..., num_orders, c]``, each order's weight
        broadcast over its intermediates. A per-edge weight per channel commutes with the
        channel-wise products, so the recoupling stays exact (still no per-edge tensor product)."""
        parts = values.split(self.intermediate_sizes, dim=-2)
        return torch.cat([part * weights[..., o : o + 1, :] for o, part in enumerate(parts)], dim=-2)

    def _edge_weights(self, geometry: Neighbourhood) -> torch.Tensor:
        """``[E, orders, C]``: ``phi_L(d) / (d / cutoff)^L``, so that each order's message is
        ``phi_L(d) [v_j (x) Y^L(unit vector)]`` with unit-norm directions, as in Equiformer."""
        radial = self.radial(geometry.distance_basis).view(-1, len(self.products), self.channels)
        inverse_power = geometry.scaled_distance[:, None] ** -self.orders.to(radial.dtype)  # [E, orders]
        return radial * inverse_power[:, :, None]

    def _attend_qk(self, x: torch.Tensor, intermediate: torch.Tensor, geometry: Neighbourhood):
        heads, d = self.num_heads, self.alpha_channels
        n, p, c = geometry.num_nodes, intermediate.shape[1], self.channels
        scalars = x[:, 0]  # [N, C]
        query = self.query(scalars).view(n, heads, 1, d)
        key = self.key(scalars).index_select(0, geometry.edge_source)
        key = key * self.key_radial(geometry.distance_basis)  # [E, H*d]
        key = geometry.padded(key.view(-1, heads, d)).transpose(1, 2)  # [N, H, 1+D, d]
        # values gathered once, straight into the padded per-head layout
        per_head = intermediate.view(-1, p, heads, c // heads).transpose(1, 2)  # [S, H, P, C/H]
        per_head = torch.cat([per_head, per_head.new_zeros(1, *per_head.shape[1:])])  # row S: zero
        head_index = torch.arange(heads, device=x.device)[None, :, None]
        value = per_head[geometry.slot_image[:, None, :], head_index]  # [N, H, 1+D, P, C/H]
        radial = self._edge_weights(geometry).view(-1, len(self.products), heads, c // heads)
        radial = geometry.padded(radial).permute(0, 3, 1, 2, 4)  # [N, H, 1+D, orders, C/H]
        value = self._by_order(value, radial).flatten(3)  # [N, H, 1+D, P*C/H]
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=geometry.slot_bias[:, None, None, :]
        )  # [N, H, 1, P*C/H]
        return out.view(n, heads, p, c // heads).transpose(1, 2).reshape(n, p, c)

    def _attend_mlp(self, x: torch.Tensor, intermediate: torch.Tensor, geometry: Neighbourhood):
        # The logit is a non-linear function of both ends, not a query-key product, so this is
        # not scaled-dot-product arithmetic: explicit softmax over edges, weighted sum by scatter.
        heads, n, p, c = self.num_heads, geometry.num_nodes, intermediate.shape[1], self.channels
        scalars = x[:, 0]  # [N, C]
        target, source = geometry.edge_target, geometry.edge_source
        mixed = self.alpha_target(scalars).index_select(0, target)
        mixed = mixed + self.alpha_source(scalars).index_select(0, source)  # [E, H*A]
        radial = self.alpha_radial(geometry.distance_basis)
        mixed = mixed * radial if self.alpha_type == "dot" else mixed + radial
        features = self.alpha_act(mixed).view(-1, heads, self.alpha_channels)
        logits = torch.einsum("eha,ha->eh", features, self.alpha_dot) + geometry.log_envelope[:, None]
        sink = logits.new_zeros(n, heads)
        nodes = torch.arange(n, device=target.device)
        alpha = graph_softmax(torch.cat([logits, sink]), torch.cat([target, nodes]), n)[: len(target)]
        weights = self._edge_weights(geometry).view(-1, len(self.products), heads, c // heads)
        weights = (weights * alpha[:, None, :, None]).flatten(2)  # [E, orders, C]
        messages = self._by_order(intermediate.index_select(0, geometry.edge_image), weights)  # [E, P, C]
        return messages.new_zeros(n, p, c).index_add_(0, target, messages)

    def forward(self, x: torch.Tensor, geometry: Neighbourhood) -> torch.Tensor:
        intermediate = self._intermediates(x, geometry)  # [S, P, C]
        attend = self._attend_qk if self.alpha_type == "QK" else self._attend_mlp
        aggregated = attend(x, intermediate, geometry)  # [N, P, C]
        outputs = [
            tp.target_stage(part, geometry.node_pos)
            for tp, part in zip(self.products, aggregated.split(self.intermediate_sizes, dim=1))
        ]  # each [N, K, C]
        if self.order_gate is None:
            out = outputs[0]
        else:
            gates = torch.sigmoid(self.order_gate(x[:, 0])).view(-1, len(outputs), 1, self.channels)
            out = sum(gates[:, i] * o for i, o in enumerate(outputs))
        return self.output(out)
