"""Equivariant graph attention built on SO(2) convolutions (EquiformerV2, Liao et al. 2023).

Per edge: concatenate source and target features, rotate them into the edge frame, SO(2)
convolution weighted by a radial MLP, then (i) attention logits from invariant outputs with
attention re-normalisation (LayerNorm, SmoothLeakyReLU, dot product per head, softmax over the
target's edges) and (ii) values through an S2 (or gate) activation and a second SO(2)
convolution. Weighted values are rotated back, summed per target and projected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fairchem_equiformers.primitives import (
    EdgeRotation,
    GateActivation,
    RadialMLP,
    S2Activation,
    S2Grid,
    SeparableS2Activation,
    SmoothLeakyReLU,
    SO2Convolution,
    SO3Linear,
    SphericalLayout,
    graph_softmax,
    row_blocks,
)


@dataclass
class EdgeContext:
    """Everything about the edges of a batch that every layer reuses.

    ``edge_index: [2, E]`` (source, target); ``edge_scalars: [E, F]`` invariant edge inputs
    (distance basis, and the shared atom embeddings when those are enabled);
    ``source_z, target_z: [E]``; ``rotation``: the per-edge Wigner blocks."""

    edge_index: torch.Tensor
    edge_scalars: torch.Tensor
    source_z: torch.Tensor
    target_z: torch.Tensor
    rotation: EdgeRotation
    num_nodes: int

    def chunks(self, bytes_per_edge: int) -> list[EdgeContext]:
        """The edges in consecutive chunks whose per-edge intermediates of ``bytes_per_edge``
        take about ``EDGE_CHUNK_BYTES`` each, when no gradient is being recorded; otherwise
        (autograd keeps the intermediates anyway) all edges in one chunk. Node indices stay
        global. Chunked intermediates stay in cache and are reused by the allocator instead
        of being mapped afresh (and page-faulted) for every operation."""
        blocks = row_blocks(self.edge_index.shape[1], bytes_per_edge, EDGE_CHUNK_BYTES)
        if torch.is_grad_enabled() or len(blocks) <= 1:
            return [self]
        return [self._rows(rows) for rows in blocks]

    def _rows(self, rows: slice) -> EdgeContext:
        return EdgeContext(
            edge_index=self.edge_index[:, rows],
            edge_scalars=self.edge_scalars[rows],
            source_z=self.source_z[rows],
            target_z=self.target_z[rows],
            rotation=self.rotation.edges(rows),
            num_nodes=self.num_nodes,
        )


# Size of the per-edge intermediates of one chunk of edges in a no-grad forward (bytes).
EDGE_CHUNK_BYTES = 16 << 20


def attach_element_embeddings(
    module: nn.Module, enabled: bool, max_num_elements: int, radial_channels: list[int]
) -> list[int]:
    """Give ``module`` ``source_embedding``/``target_embedding`` (element embeddings of width
    ``radial_channels[-1]``, initialised near zero; the released parameter names) when
    ``enabled``, else ``None``. Returns the radial MLP sizes widened for them."""
    radial_channels = list(radial_channels)
    module.source_embedding = module.target_embedding = None
    if enabled:
        for name in ("source_embedding", "target_embedding"):
            embedding = nn.Embedding(max_num_elements, radial_channels[-1])
            nn.init.uniform_(embedding.weight, -0.001, 0.001)
            setattr(module, name, embedding)
        radial_channels[0] += 2 * radial_channels[-1]
    return radial_channels


def with_element_embeddings(
    edge_scalars: torch.Tensor,
    source_embedding: nn.Embedding | None,
    target_embedding: nn.Embedding | None,
    edges: EdgeContext,
) -> torch.Tensor:
    """``[E, F] -> [E, F + 2 * channels]``: appends the source and target element embeddings
    (unchanged when the module has none)."""
    if source_embedding is None:
        return edge_scalars
    return torch.cat(
        [edge_scalars, source_embedding(edges.source_z), target_embedding(edges.target_z)], dim=1
    )


class SO2GraphAttention(nn.Module):
    """Multi-head equivariant graph attention with non-linear messages.

    ``radial_channels = [F, hidden, hidden]``: the radial MLP's input and hidden sizes (F
    counts the distance basis and, when shared, the atom embeddings).

    ``output_degree``: compute only that degree's outputs (a direct-force head reads degree 1
    alone): the value convolution, the rotation back and the projection skip every other row.

    Shapes: ``x: [N, K, C] -> [N, K, output_channels]``, or ``[N, 2l+1, output_channels]``
    with ``output_degree=l``.
    """

    def __init__(
        self,
        layout: SphericalLayout,
        grid: S2Grid,
        sphere_channels: int,
        hidden_channels: int,
        num_heads: int,
        attn_alpha_channels: int,
        attn_value_channels: int,
        output_channels: int,
        max_num_elements: int,
        radial_channels: list[int],
        use_atom_edge_embedding: bool,
        use_m_share_rad: bool,
        use_attn_renorm: bool,
        use_gate_act: bool,
        use_sep_s2_act: bool,
        alpha_drop: float,
        output_degree: int | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.output_degree = output_degree
        self.num_heads = num_heads
        self.attn_alpha_channels = attn_alpha_channels
        self.attn_value_channels = attn_value_channels
        self.use_m_share_rad = use_m_share_rad
        self.use_gate_act = use_gate_act
        self.use_sep_s2_act = use_sep_s2_act

        radial_channels = attach_element_embeddings(
            self, use_atom_edge_embedding, max_num_elements, radial_channels
        )

        lmax = layout.lmax
        num_gates = 0
        if use_gate_act:
            num_gates = lmax * hidden_channels
        elif use_sep_s2_act:
            num_gates = hidden_channels
        self.num_gates = num_gates

        if use_m_share_rad:
            # one radial weight per (degree, channel), shared by all orders m
            self.rad_func = RadialMLP([*radial_channels, 2 * sphere_channels * (lmax + 1)])
            self.register_buffer(
                "degree_of_edge_coefficient",
                torch.tensor([l for l, _ in layout.edge_lm]),
                persistent=False,
            )
        self.so2_conv_1 = SO2Convolution(
            layout,
            2 * sphere_channels,
            hidden_channels,
            radial_channels=None if use_m_share_rad else radial_channels,
            extra_m0_channels=num_heads * attn_alpha_channels + num_gates,
        )
        self.alpha_norm = nn.LayerNorm(attn_alpha_channels) if use_attn_renorm else nn.Identity()
        self.alpha_act = SmoothLeakyReLU(0.2)
        bound = attn_alpha_channels**-0.5
        self.alpha_dot = nn.Parameter(torch.empty(num_heads, attn_alpha_channels).uniform_(-bound, bound))
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop > 0 else None

        if use_gate_act:
            degrees = [l for l, _ in layout.edge_lm[1:]]
            self.gate_act = GateActivation(degrees, lmax, hidden_channels)
        elif use_sep_s2_act:
            self.s2_act = SeparableS2Activation(grid)
        else:
            self.s2_act = S2Activation(grid)

        self.so2_conv_2 = SO2Convolution(layout, hidden_channels, num_heads * attn_value_channels)
        self.proj = SO3Linear(num_heads * attn_value_channels, output_channels, lmax=lmax)
        if output_degree is not None:
            # weights that cannot reach that degree stay (checkpoints carry them) but are frozen:
            # no gradient is expected for them (DistributedDataParallel requires every trainable
            # parameter to get one)
            unreachable = [
                p for conv in self.so2_conv_2.so2_m_conv[output_degree:] for p in conv.parameters()
            ]
            if output_degree > 0:
                unreachable.append(self.proj.bias)
            for parameter in unreachable:
                parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor, edges: EdgeContext) -> torch.Tensor:
        chunks = edges.chunks(x.shape[1] * 2 * x.shape[2] * x.element_size())
        order_weights = self.so2_conv_1.order_weights(), self.so2_conv_2.order_weights()
        values, logits = zip(*(self._messages(x, chunk, *order_weights) for chunk in chunks))
        alpha = graph_softmax(torch.cat(logits), edges.edge_index[1], edges.num_nodes)  # [E, H]
        if self.alpha_dropout is not None:
            alpha = self.alpha_dropout(alpha)
        rows = x.shape[1] if self.output_degree is None else 2 * self.output_degree + 1
        aggregated = x.new_zeros(edges.num_nodes, rows, self.num_heads * self.attn_value_channels)
        for chunk, value, chunk_alpha in zip(chunks, values, alpha.split([v.shape[0] for v in values])):
            value = value.view(value.shape[0], value.shape[1], self.num_heads, self.attn_value_channels)
            value = (value * chunk_alpha[:, None, :, None]).flatten(2)  # [e, K_e (or 2m+1), H * V]
            if self.output_degree is None:
                value = chunk.rotation.from_edge(value)  # [e, K, H * V]
            else:
                value = chunk.rotation.from_edge_degree(value, self.output_degree)  # [e, 2l+1, H * V]
            aggregated.index_add_(0, chunk.edge_index[1], value.to(aggregated.dtype))  # autocast: half
        if self.output_degree is None:
            return self.proj(aggregated)
        return self.proj.forward_degree(aggregated, self.output_degree)

    def _messages(
        self,
        x: torch.Tensor,
        edges: EdgeContext,
        order_weights_1: list[tuple[torch.Tensor, ...]],
        order_weights_2: list[tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values ``[E, K_e, H * V]`` (edge frame; only ``output_degree``'s rows when set) and
        attention logits ``[E, H]`` of ``edges``.
        ``order_weights_*``: the SO(2) convolutions' order weights, built once per forward."""
        edge_scalars = with_element_embeddings(
            edges.edge_scalars, self.source_embedding, self.target_embedding, edges
        )

        message = edges.rotation.gather_to_edge(x, edges.edge_index)  # orders of [E, K_e, 2C]
        if self.use_m_share_rad:  # one weight per degree: the same before or after the rotation
            weight = self.rad_func(edge_scalars).view(-1, self.layout.lmax + 1, 2 * x.shape[2])
            weight = weight.index_select(1, self.degree_of_edge_coefficient)  # [E, K_e, 2C]
            message = [m * w for m, w in zip(message, weight.split(self.layout.order_rows, 1))]

        if self.use_m_share_rad:
            message, extra = self.so2_conv_1(message, order_weights=order_weights_1)
        else:  # [E, K_e, hidden]
            message, extra = self.so2_conv_1(message, edge_scalars, order_weights_1)
        alpha_inputs, gates = extra.split([extra.shape[1] - self.num_gates, self.num_gates], dim=1)

        if self.use_gate_act:
            message = self.gate_act(gates, message)
        elif self.use_sep_s2_act:
            message = self.s2_act(gates, message)
        else:
            message = self.s2_act(message)
        if self.output_degree is None:
            value = self.so2_conv_2(message, order_weights=order_weights_2)  # [E, K_e, H * V]
        else:
            value = self.so2_conv_2.forward_degree(message, self.output_degree)  # [E, 2m+1, H * V]

        alpha = self.alpha_act(
            self.alpha_norm(alpha_inputs.view(-1, self.num_heads, self.attn_alpha_channels))
        )
        return value, (alpha * self.alpha_dot).sum(dim=-1)  # [E, H]
