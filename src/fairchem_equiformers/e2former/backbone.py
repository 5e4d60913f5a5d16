"""The E2Former backbone (Liu, Wang, Wang, Dral; arXiv:2501.19216): equivariant attention whose
tensor products with the edge's solid harmonics are computed once per node by Wigner-6j
recoupling. The backbone is the neighbourhood, the atom embedding (and optional encoder), the
blocks and the final norm; its heads are in ``heads.py``, the composite model in ``model.py``.

Deviations from the public code, each deliberate: positions enter relative to each graph's
centre (the identity is exact, but its float32 round-off grows with |r|^L); periodic sources are
(atom, cell offset) images; attention has a zero "sink" and a smooth cutoff envelope so the
energy is continuous when atoms cross the cutoff; features carry no parity label (all paths by
the triangle rule, as EquiformerV2). Every argument has a default; the model runs in float64.

Forces ``-dE/dpos`` (``direct_forces=False``) and the stress ``(1/V) dE/d(strain)`` of periodic
systems (``regress_stress``) come from the shared gradient head (``heads/gradient.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from e3nn import o3
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad
from fairchem.core.models.base import BackboneInterface, GraphModelMixin
from torch import nn

from fairchem_equiformers.heads import check_gradient_outputs, gradient_inputs, strained
from fairchem_equiformers.primitives import (
    NORMS,
    GaussianBasis,
    PolynomialEnvelope,
    build_graph,
    check_common_model_keys,
    check_structures,
    equivariant_norm,
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


@dataclass
class E2FormerState:
    """What ``embed`` hands to ``interact`` and ``readout``: the neighbourhood and the positions
    and strain the gradient head differentiates by."""

    geometry: Neighbourhood
    pos: torch.Tensor
    strain: torch.Tensor | None


@registry.register_model("fairchem_equiformers.E2FormerBackbone")
class E2FormerBackbone(nn.Module, GraphModelMixin, BackboneInterface):
    """The E2Former backbone: ``forward(data)`` returns ``{"node_embedding": [N, K, C]`` (after the
    final norm), ``"graph"``: the ``Neighbourhood``, ``"pos"``, ``"strain"``} (see
    ``fairchem_equiformers.heads``). Its heads: ``E2FormerEnergyHead``, ``E2FormerForceHead``, or
    the shared ``GradientHead``. ``forward`` is ``readout(interact(*embed(data)))``: the protocol
    a DEQ uses to replace ``interact`` (the blocks) by their fixed point.

    ``direct_forces``: ``False`` (default) means forces ``-dE/dpos``: the backbone returns
    positions that require grad; ``True`` means forces from a force head. ``regress_stress``
    (needs ``direct_forces=False``, ``regress_forces`` and ``use_pbc``) also returns the strain
    the positions and cell shifts were deformed by (``1 + sym(strain)`` per graph), for the stress.

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
        enforce_max_neighbors_strictly: ``False`` (default) keeps every neighbour as close as the
            ``max_neighbors``-th (fairchem's rule, ties within 0.01 A): a strict cut drops one of
            two equidistant neighbours (an atom's own images at +-a in a small cell) by float32
            round-off, which breaks rotation symmetry (measured with the defaults on a rattled
            Cu(111)+O slab: force error 9.4e-4 strict, 2.6e-14 not; ``bench_symmetry.py``).
    """

    DROPOUT_KEYS = ("drop_path_rate",)

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        regress_forces: bool = True,
        direct_forces: bool = False,
        regress_stress: bool = False,
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
        enforce_max_neighbors_strictly: bool = False,
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
        check_gradient_outputs(regress_forces, direct_forces, regress_stress, use_pbc)
        self.use_pbc, self.use_pbc_single, self.otf_graph = use_pbc, use_pbc_single, otf_graph
        self.regress_forces, self.direct_forces = regress_forces, direct_forces
        self.regress_stress = regress_stress
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
        self.heads_pending = True  # heads built by add_heads are created in the released order
        self.add_heads()
        self.heads_pending = False

    def add_heads(self) -> None:
        """Where a composite model adds its heads (none in the bare backbone): they are then
        created right after the final norm, so a seed gives the same initial weights as ever."""

    @property
    def energy_head_class(self) -> type:
        from .heads import E2FormerEnergyHead

        return E2FormerEnergyHead

    @property
    def conservative(self) -> bool:
        """Whether the forces are the energy's gradient (then computed even under no_grad)."""
        return self.regress_forces and not self.direct_forces

    @property
    def interaction_blocks(self) -> list[nn.Module]:
        """The modules ``interact`` runs, in order: each block, then its cluster attention."""
        if self.clusters is None:
            return list(self.blocks)
        return [module for pair in zip(self.blocks, self.clusters) for module in pair]

    def interaction_norm(self) -> nn.Module:
        """A new norm for the state ``[N, K, C]`` of the blocks (the one a DEQ puts on it):
        ``rms_norm_sh``, one scale for every degree. The injection (``embed``) has no ``l > 0``
        part, so a norm that brought ``l > 0`` to unit scale on its own (``layer_norm_sh``) would
        undo the blocks' contraction there: measured on the tiny test model, the plain iteration
        then contracts by 0.98 per step and 100 Anderson steps stop at a relative residual of
        2e-2, against 13-15 steps to 6e-11 with ``rms_norm_sh``."""
        return equivariant_norm("rms_norm_sh", self.lmax, self.channels)

    def neighbourhood(self, data, pos: torch.Tensor, strain: torch.Tensor | None = None) -> Neighbourhood:
        """The geometry every block shares, from the graph of ``data`` with positions ``pos``
        ``[N, 3]`` and, with ``strain`` ``[B, 3, 3]``, the positions and cell shifts deformed by
        ``1 + sym(strain)`` per graph (both alike, so every edge vector is deformed)."""
        batch, num_graphs = data.batch, len(data.natoms)
        graph = build_graph(self, data, pos)
        source, target = graph.edge_index
        # centre of each graph (detached: the energy depends on differences only)
        centre = pos.new_zeros(num_graphs, 3).index_add_(0, batch, pos.detach())
        centre = centre / data.natoms.to(pos.dtype)[:, None]
        # the strain deforms positions about the (constant) centre: a translation of the
        # positions deformed about the origin, so the energy is the same
        relative = strained(pos - centre.index_select(0, batch), strain, batch)  # [N, 3]
        offsets = graph.cell_shift  # [E, 3]

        # images: distinct (atom, offset) sources
        key = torch.cat([source[:, None].to(offsets.dtype), offsets], dim=1)  # [E, 4]
        unique_keys, edge_image = torch.unique(key.detach(), dim=0, return_inverse=True)
        image_atom = unique_keys[:, 0].long()
        image_offset = torch.zeros_like(unique_keys[:, 1:]).index_copy(0, edge_image, offsets)
        image_offset = strained(image_offset, strain, batch.index_select(0, image_atom))  # [S, 3]
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

    def embed(self, data) -> tuple[torch.Tensor, E2FormerState]:
        """Checks, neighbourhood, and the atom embedding (through the encoder when there is one)
        as the scalars of ``x: [N, K, C]`` (higher degrees zero)."""
        pos, strain = gradient_inputs(data, forces=self.conservative, stress=self.regress_stress)
        atomic_numbers = data.atomic_numbers.long()
        check_structures(
            atomic_numbers, pos, data.natoms, self.max_num_elements,
            cell=data.cell if self.use_pbc else None, sid=getattr(data, "sid", None),
        )  # fmt: skip
        geometry = self.neighbourhood(data, pos, strain)
        scalars = self.atom_embedding(atomic_numbers).to(pos.dtype)  # [N, C]
        if self.encoder is not None:
            scalars = self.encoder(scalars, geometry)
        higher = scalars.new_zeros(len(scalars), (self.lmax + 1) ** 2 - 1, self.channels)
        x = torch.cat([scalars[:, None], higher], dim=1)  # [N, K, C]
        return x, E2FormerState(geometry, pos, strain)

    def interact(self, x: torch.Tensor, state: E2FormerState, data) -> torch.Tensor:
        """The blocks (each followed by its cluster attention when enabled), ``[N, K, C] -> [N, K, C]``."""
        num_graphs = len(data.natoms)
        for i, block in enumerate(self.blocks):
            x = block(x, state.geometry, data.batch, num_graphs)
            if self.clusters is not None:
                x = self.clusters[i](x, data.batch, num_graphs)
        return x

    def readout(self, x: torch.Tensor, state: E2FormerState, data) -> dict:
        """The final norm, and the embeddings the heads read."""
        emb = {"node_embedding": self.norm(x), "graph": state.geometry}
        return {**emb, "pos": state.pos, "strain": state.strain}

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict:
        x, state = self.embed(data)
        return self.readout(self.interact(x, state, data), state, data)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: every bias (``bias``, the norms' ``affine_bias``),
        every parameter of a normalisation layer (``nn.LayerNorm``, also inside the radial MLPs,
        and the equivariant norms), the embeddings (``nn.Embedding``), and the encoder's
        distance-bias projection (``distance_bias``, weight included). Every other weight (linear,
        SO3-linear, tensor-product and attention weights) is decayed.

        This is the set E2Former has been trained with: the plugin's rule (biases and norms,
        ``training/param_groups.py``) plus fairchem's name-based default (names containing
        ``embedding`` or ``bias``), which E2Former fell back to before it declared its own."""
        norms = (nn.LayerNorm, *NORMS.values())
        exempt = set()
        for module_name, module in self.named_modules():
            whole = isinstance(module, (*norms, nn.Embedding)) or module_name.endswith("distance_bias")
            for param_name, _ in module.named_parameters(recurse=False):
                if whole or param_name == "bias" or param_name.endswith("_bias"):
                    exempt.add(f"{module_name}.{param_name}" if module_name else param_name)
        return exempt
