"""E2Former (Liu, Wang, Wang, Dral; arXiv:2501.19216): equivariant attention whose tensor
products with the edge's solid harmonics are computed once per node by Wigner-6j recoupling.

Deviations from the public code, each deliberate: positions enter relative to each graph's
centre (the identity is exact, but its float32 round-off grows with |r|^L); periodic sources are
(atom, cell offset) images; attention has a zero "sink" and a smooth cutoff envelope so the
energy is continuous when atoms cross the cutoff; features carry no parity label (all paths by
the triangle rule, as EquiformerV2). Every argument has a default; the model runs in float64.
"""

from __future__ import annotations

import copy

import torch
from e3nn import o3
from fairchem.core.common.registry import registry
from fairchem.core.models.base import GraphModelMixin
from torch import nn

from fairchem_equiformers.primitives import (
    GaussianBasis,
    PolynomialEnvelope,
    check_common_model_keys,
    check_structures,
    equivariant_norm,
    radius_graph_nonperiodic,
)

from .attention import (
    ALPHA_TYPES,
    ATTENTION_ORDERS,
    Neighbourhood,
    Wigner6jAttention,
    edge_slots,
    pad_edges,
)
from .block import E2FormerBlock, GatedFeedForward, MixtureOfExperts
from .cluster import ClusterAttention
from .encoder import DistanceBiasedEncoder


def parse_node_irreps(irreps: str) -> tuple[int, int]:
    """``"Cx0e+Cx1e+...+Cx(lmax)e"`` -> ``(lmax, C)``: every degree 0..lmax once, one channel
    count (the recoupled products are channel-wise). Parity letters are accepted but not used."""
    try:
        parsed = o3.Irreps(irreps)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"irreps_node_embedding={irreps!r} is not an irreps string: {error}") from None
    degrees = [ir.l for _, ir in parsed]
    channels = {mul for mul, _ in parsed}
    if degrees != list(range(len(degrees))) or len(degrees) < 2:
        raise ValueError(
            f"irreps_node_embedding={irreps!r}: need each degree 0, 1, ..., lmax (lmax >= 1) exactly once, "
            f"in order; got degrees {degrees}"
        )
    if len(channels) != 1:
        raise ValueError(
            f"irreps_node_embedding={irreps!r}: every degree must have the same channel count "
            f"(e.g. '128x0e+128x1e+128x2e'); got {sorted(channels)}"
        )
    return degrees[-1], channels.pop()


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {list(allowed)}")


@registry.register_model("fairchem_equiformers.E2Former")
class E2Former(nn.Module, GraphModelMixin):
    """E2Former energy and force model. ``forward(data)`` returns ``{"energy": [B]}`` and, with
    ``regress_forces``, ``"forces": [N, 3]``: ``-dE/dpos`` (graph kept while training) or, with
    ``direct_forces``, the l = 1 output of a gated head.

    Args:
        irreps_node_embedding: node features, one channel count for all degrees.
        attn_type: ``zero-order``, ``first-order``, ``second-order`` or ``all-order``.
        alpha_type: attention logits ``QK``, ``dot`` or ``dot_small`` (see ``Wigner6jAttention``).
        attn_alpha_channels: query/key (or alpha MLP) width per head.
        encoder: ``None`` or ``"transformer"``: an invariant transformer over atoms with
            distance-biased attention (``encoder_layers`` blocks) that initialises the scalars.
        num_experts: 0 for a plain gated FFN, otherwise a mixture of that many (``moe_top_k``).
        num_clusters: 0, or that many soft clusters per graph attending to each other after
            every block (long range beyond the cutoff; see ``ClusterAttention``).
    """

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        regress_forces: bool = True,
        direct_forces: bool = False,
        otf_graph: bool = True,
        max_neighbors: int = 20,
        max_radius: float = 6.0,
        max_num_elements: int = 90,
        irreps_node_embedding: str = "128x0e+128x1e+128x2e",
        num_layers: int = 8,
        num_heads: int = 8,
        attn_type: str = "all-order",
        alpha_type: str = "QK",
        attn_alpha_channels: int = 32,
        ffn_hidden_channels: int = 256,
        norm_type: str = "rms_norm_sh",
        num_distance_basis: int = 128,
        edge_channels: int = 64,
        drop_path_rate: float = 0.0,
        encoder: str | None = None,
        encoder_layers: int = 2,
        num_experts: int = 0,
        moe_top_k: int = 2,
        num_clusters: int = 0,
        enforce_max_neighbors_strictly: bool = True,
    ) -> None:
        super().__init__()
        check_common_model_keys(
            use_pbc=use_pbc, use_pbc_single=use_pbc_single, otf_graph=otf_graph,
            regress_forces=regress_forces, enforce_max_neighbors_strictly=enforce_max_neighbors_strictly,
            max_neighbors=max_neighbors, max_radius=max_radius, max_num_elements=max_num_elements,
        )  # fmt: skip
        lmax, channels = parse_node_irreps(irreps_node_embedding)
        _choice("attn_type", attn_type, ATTENTION_ORDERS)
        _choice("alpha_type", alpha_type, ALPHA_TYPES)
        _choice("norm_type", norm_type, ["layer_norm", "layer_norm_sh", "rms_norm_sh"])
        _choice("encoder", encoder, [None, "transformer"])
        self.use_pbc, self.use_pbc_single, self.otf_graph = use_pbc, use_pbc_single, otf_graph
        self.regress_forces, self.direct_forces = regress_forces, direct_forces
        self.max_neighbors, self.max_radius, self.cutoff = max_neighbors, max_radius, max_radius
        self.max_num_elements = max_num_elements
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.lmax, self.channels = lmax, channels

        self.atom_embedding = nn.Embedding(max_num_elements, channels)
        self.distance_expansion = GaussianBasis(0.0, max_radius, num_distance_basis, 2.0)
        self.envelope = PolynomialEnvelope(5)
        self.encoder = (
            DistanceBiasedEncoder(
                channels, num_heads, encoder_layers, num_distance_basis, ffn_hidden_channels
            )
            if encoder
            else None
        )

        def ffn() -> nn.Module:
            if num_experts:
                return MixtureOfExperts(lmax, channels, ffn_hidden_channels, num_experts, moe_top_k)
            return GatedFeedForward(lmax, channels, ffn_hidden_channels, channels)

        self.blocks = nn.ModuleList(
            E2FormerBlock(
                Wigner6jAttention(
                    lmax,
                    channels,
                    num_heads,
                    attn_type,
                    alpha_type,
                    attn_alpha_channels,
                    num_distance_basis,
                    edge_channels,
                ),
                ffn(),
                norm_type,
                lmax,
                channels,
                drop_path_rate,
            )
            for _ in range(num_layers)
        )
        self.clusters = (
            nn.ModuleList(
                ClusterAttention(lmax, channels, num_heads, num_clusters) for _ in range(num_layers)
            )
            if num_clusters
            else None
        )
        self.norm = equivariant_norm(norm_type, lmax, channels)
        self.energy_head = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))
        self.force_head = (
            GatedFeedForward(lmax, channels, channels, 1) if regress_forces and direct_forces else None
        )

    def _edges(self, data, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge index ``[2, E]`` (source, target) and the cell offset of each source ``[E, 3]``.

        Periodic graphs come from fairchem's neighbour search (float32 only); the offsets are
        then recomputed in the positions' precision from its integer cell offsets."""
        if not self.use_pbc and self.otf_graph:
            edge_index = radius_graph_nonperiodic(pos, data.batch, self.max_radius, self.max_neighbors)
            return edge_index, pos.new_zeros(edge_index.shape[1], 3)
        search_input = copy.copy(data)
        search_input.pos = pos.detach().float()
        if self.use_pbc:
            search_input.cell = data.cell.detach().float()
        graph = self.generate_graph(
            search_input,
            enforce_max_neighbors_strictly=self.enforce_max_neighbors_strictly,
            use_pbc_single=self.use_pbc_single,
        )
        if not self.use_pbc:
            return graph.edge_index, pos.new_zeros(graph.edge_index.shape[1], 3)
        cells = data.cell.to(pos.dtype)[data.batch[graph.edge_index[0]]]  # [E, 3, 3]
        return graph.edge_index, torch.einsum("ei,eij->ej", graph.cell_offsets.to(pos.dtype), cells)

    def _neighbourhood(self, data, pos: torch.Tensor, num_graphs: int) -> Neighbourhood:
        batch = data.batch
        edge_index, offsets = self._edges(data, pos)  # [2, E], [E, 3]
        source, target = edge_index
        # centre of each graph (detached: the energy depends on differences only)
        centre = pos.new_zeros(num_graphs, 3).index_add_(0, batch, pos.detach())
        centre = centre / data.natoms.to(pos.dtype)[:, None]
        relative = pos - centre.index_select(0, batch)  # [N, 3]

        # images: distinct (atom, offset) sources
        key = torch.cat([source[:, None].to(offsets.dtype), offsets], dim=1)  # [E, 4]
        unique_keys, edge_image = torch.unique(key.detach(), dim=0, return_inverse=True)
        image_atom = unique_keys[:, 0].long()
        image_offset = torch.zeros_like(unique_keys[:, 1:]).index_copy(0, edge_image, offsets)
        image_pos = relative.index_select(0, image_atom) + image_offset  # [S, 3]

        distance = (image_pos.index_select(0, edge_image) - relative.index_select(0, target)).norm(dim=-1)
        scaled = distance / self.max_radius
        log_envelope = torch.log(self.envelope(scaled).clamp_min(torch.finfo(pos.dtype).tiny))  # [E]
        slots = edge_slots(target, len(pos))  # [N, D]
        # the padded layout: slot 0 the sink, then each target's edges, then padding
        slot_edge = torch.cat([slots.new_full((len(pos), 1), len(target)), slots], dim=1)  # [N, 1+D]
        sentinel = edge_image.new_full((1,), len(image_atom))
        slot_image = torch.cat([edge_image, sentinel]).index_select(0, slot_edge.flatten()).view_as(slot_edge)
        is_padding = torch.cat([slots.new_zeros(len(pos), 1, dtype=torch.bool), slots == len(target)], dim=1)
        slot_bias = pad_edges(log_envelope, slots).masked_fill(is_padding, float("-inf"))  # [N, 1+D]
        return Neighbourhood(
            edge_image=edge_image,
            edge_target=target,
            image_atom=image_atom,
            image_pos=image_pos / self.max_radius,
            node_pos=relative / self.max_radius,
            scaled_distance=scaled,
            distance_basis=self.distance_expansion(distance),
            log_envelope=log_envelope,
            slots=slots,
            slot_image=slot_image,
            slot_bias=slot_bias,
        )

    def forward(self, data) -> dict[str, torch.Tensor]:
        atomic_numbers = data.atomic_numbers.long()
        natoms, batch = data.natoms, data.batch
        check_structures(
            atomic_numbers, data.pos, natoms, self.max_num_elements,
            cell=data.cell if self.use_pbc else None, sid=getattr(data, "sid", None),
        )  # fmt: skip
        num_graphs = len(natoms)
        gradient_forces = self.regress_forces and not self.direct_forces
        pos = data.pos
        if gradient_forces:
            pos = pos.detach().requires_grad_(True)
        with torch.set_grad_enabled(gradient_forces or torch.is_grad_enabled()):
            geometry = self._neighbourhood(data, pos, num_graphs)
            scalars = self.atom_embedding(atomic_numbers).to(pos.dtype)  # [N, C]
            if self.encoder is not None:
                scalars = self.encoder(scalars, geometry)
            higher = scalars.new_zeros(len(scalars), (self.lmax + 1) ** 2 - 1, self.channels)
            x = torch.cat([scalars[:, None], higher], dim=1)  # [N, K, C]
            for i, block in enumerate(self.blocks):
                x = block(x, geometry, batch, num_graphs)  # [N, K, C]
                if self.clusters is not None:
                    x = self.clusters[i](x, batch, num_graphs)
            x = self.norm(x)
            node_energy = self.energy_head(x[:, 0])[:, 0]  # [N]
            energy = node_energy.new_zeros(num_graphs).index_add_(0, batch, node_energy)
            if gradient_forces:
                (gradient,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
        outputs = {"energy": energy}
        if gradient_forces:
            outputs["forces"] = -gradient
        elif self.regress_forces:
            outputs["forces"] = self.force_head(x)[:, 1:4, 0].contiguous()  # l = 1 is (x, y, z)
        return outputs

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
