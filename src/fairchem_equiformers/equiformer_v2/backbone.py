"""The EquiformerV2 backbone (Liao, Wood, Das, Smidt; arXiv:2306.12059): embeddings, transformer
blocks and the final norm; its heads are in ``heads.py``, the composite model in ``model.py``.

Differences from fairchem 1.10's implementation, none of which changes the function computed:
the edge frame is a deterministic function of the edge vector (the reference draws the
rotation about the edge axis at random); Wigner matrices are kept per degree and only for the
orders that survive the ``mmax`` truncation; coefficient re-orderings are index operations; the
model runs in float64. Attribute names follow the released checkpoints, whose flat layout (any
number of ``module.`` prefixes, duplicated per-block buffers) and fairchem's backbone+heads
layout both load (see ``checkpoint.py``).

Beyond the released model: conservative forces ``-dE/dpos`` (``direct_forces=False``; the
edge frames are differentiable, nothing is detached) and the stress ``(1/V) dE/d(strain)`` of
periodic systems (``regress_stress``), through the shared gradient head (``heads/gradient.py``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad
from fairchem.core.models.base import BackboneInterface, GraphModelMixin
from torch import nn

from fairchem_equiformers.heads import check_gradient_outputs, gradient_inputs, strained
from fairchem_equiformers.primitives import (
    NORMS,
    EdgeRotation,
    GaussianBasis,
    RadialMLP,
    S2Grid,
    SO3Linear,
    SphericalLayout,
    build_graph,
    check_common_model_keys,
    check_precision,
    check_structures,
    equivariant_norm,
    precision_scope,
    weight_decay_exempt,
)

from .attention import EdgeContext, SO2GraphAttention, attach_element_embeddings, with_element_embeddings
from .block import EdgeDegreeEmbedding, TransformerBlock
from .feed_forward import FeedForward

# Statistics of OC20 IS2RE 100k used by the released models.
AVG_NUM_NODES = 77.81317
AVG_DEGREE = 23.395238876342773


def _single_resolution(name: str, values) -> int:
    values = [values] if isinstance(values, int) else list(values)
    if len(values) != 1:
        raise ValueError(
            f"{name}={values}: only one resolution is supported (every released EquiformerV2 "
            "uses a single-element list, e.g. lmax_list: [6])"
        )
    return int(values[0])


def _only(name: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {allowed}")


def init_weights(module: nn.Module, weight_init: str) -> None:
    """Released initialisation of every layer in ``module``: linear weights N(0, 1/fan_in)
    (``normal``) or U(+-1/sqrt(fan_in)) (``uniform``), radial MLPs always uniform, biases zero."""
    radial_linears = {id(m) for r in module.modules() if isinstance(r, RadialMLP) for m in r.modules()}
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, SO3Linear)):
            bound = 1 / math.sqrt(layer.in_features)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
            if id(layer) in radial_linears:
                nn.init.uniform_(layer.weight, -bound, bound)
            elif weight_init == "normal":
                nn.init.normal_(layer.weight, 0.0, bound)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


@dataclass
class EquiformerV2State:
    """What ``embed`` hands to ``interact`` and ``readout``: the edges and the positions and
    strain the gradient head differentiates by."""

    edges: EdgeContext
    pos: torch.Tensor
    strain: torch.Tensor | None


@registry.register_model("fairchem_equiformers.EquiformerV2Backbone")
class EquiformerV2Backbone(nn.Module, GraphModelMixin, BackboneInterface):
    """The EquiformerV2 backbone: ``forward(data)`` returns ``{"node_embedding": [N, K, C]`` (after
    the final norm), ``"graph"``: the ``EdgeContext``, ``"pos"``, ``"strain"``} (see
    ``fairchem_equiformers.heads``), plus ``"node_energy_reference": [N]`` with
    ``use_energy_lin_ref``. Its heads: ``EquiformerV2EnergyHead``, ``EquiformerV2ForceHead``, or
    the shared ``GradientHead``. ``forward`` is ``readout(interact(*embed(data)))``: the protocol
    ``DEQ`` uses to replace ``interact`` (the transformer blocks) by their fixed point.

    Takes the model-section keys of the released configs (fairchem's ``equiformer_v2``).

    ``direct_forces`` (the name fairchem's newer models use): ``True`` (released) means forces
    from a force head; ``False`` means ``-dE/dpos``: the backbone returns positions that require
    grad. ``regress_stress`` (needs ``direct_forces=False``, ``regress_forces`` and ``use_pbc``)
    also returns the strain the edge vectors were deformed by, for the stress.

    Args (beyond the released names): ``num_distance_basis`` is honoured (fairchem ignores it
    and always uses 600 Gaussians, so the default here is 600; released configs say 512 and
    must say 600 to load released checkpoints). ``num_sphere_samples`` has no effect in
    EquiformerV2 in any implementation; it is accepted only so released configs load.
    ``attn_activation``/``ffn_activation`` accept only ``"silu"`` (what the released model
    computes whatever they say); ``use_s2_act_attn`` only ``False``; ``distance_function``
    only ``"gaussian"``; ``lmax_list``/``mmax_list`` a single resolution.

    ``precision``: ``"fp32"`` (default) or ``"bf16"``: the transformer blocks and the direct force
    head under bf16 autocast (``primitives.precision_scope``); graph geometry, embeddings, the
    energy and its sum over atoms in float32. Checkpoints are the same either way.
    """

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        regress_forces: bool = True,
        direct_forces: bool = True,
        regress_stress: bool = False,
        otf_graph: bool = True,
        max_neighbors: int = 500,
        max_radius: float = 5.0,
        max_num_elements: int = 90,
        num_layers: int = 12,
        sphere_channels: int = 128,
        attn_hidden_channels: int = 128,
        num_heads: int = 8,
        attn_alpha_channels: int = 32,
        attn_value_channels: int = 16,
        ffn_hidden_channels: int = 512,
        norm_type: str = "rms_norm_sh",
        lmax_list: list[int] | int = (6,),
        mmax_list: list[int] | int = (2,),
        grid_resolution: int | None = None,
        num_sphere_samples: int | None = None,
        edge_channels: int = 128,
        use_atom_edge_embedding: bool = True,
        share_atom_edge_embedding: bool = False,
        use_m_share_rad: bool = False,
        distance_function: str = "gaussian",
        num_distance_basis: int = 600,
        attn_activation: str = "silu",
        use_s2_act_attn: bool = False,
        use_attn_renorm: bool = True,
        ffn_activation: str = "silu",
        use_gate_act: bool = False,
        use_grid_mlp: bool = False,
        use_sep_s2_act: bool = True,
        alpha_drop: float = 0.1,
        drop_path_rate: float = 0.05,
        proj_drop: float = 0.0,
        weight_init: str = "normal",
        enforce_max_neighbors_strictly: bool = True,
        avg_num_nodes: float | None = None,
        avg_degree: float | None = None,
        use_energy_lin_ref: bool = False,
        load_energy_lin_ref: bool = False,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        check_common_model_keys(
            use_pbc=use_pbc, use_pbc_single=use_pbc_single, otf_graph=otf_graph,
            regress_forces=regress_forces, enforce_max_neighbors_strictly=enforce_max_neighbors_strictly,
            max_neighbors=max_neighbors, max_radius=max_radius, max_num_elements=max_num_elements,
        )  # fmt: skip
        lmax = _single_resolution("lmax_list", lmax_list)
        mmax = _single_resolution("mmax_list", mmax_list)
        _only("attn_activation", attn_activation, ["silu"])
        _only("ffn_activation", ffn_activation, ["silu"])
        _only("use_s2_act_attn", use_s2_act_attn, [False])
        _only("distance_function", distance_function, ["gaussian"])
        _only("weight_init", weight_init, ["normal", "uniform"])
        _only("norm_type", norm_type, ["layer_norm", "layer_norm_sh", "rms_norm_sh"])
        if share_atom_edge_embedding and not use_atom_edge_embedding:
            raise ValueError("share_atom_edge_embedding=True needs use_atom_edge_embedding=True")
        if use_energy_lin_ref and not load_energy_lin_ref:
            raise ValueError(
                "use_energy_lin_ref=True needs load_energy_lin_ref=True (the references are parameters)"
            )
        check_gradient_outputs(regress_forces, direct_forces, regress_stress, use_pbc)
        check_precision(precision)
        if num_sphere_samples is not None:
            logging.info("num_sphere_samples has no effect in EquiformerV2 (accepted for released configs)")

        self.use_pbc = use_pbc
        self.use_pbc_single = use_pbc_single
        self.regress_forces = regress_forces
        self.direct_forces = direct_forces
        self.regress_stress = regress_stress
        self.precision = precision
        self.otf_graph = otf_graph
        self.max_neighbors = max_neighbors
        self.max_radius = self.cutoff = max_radius
        self.max_num_elements = max_num_elements
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.avg_num_nodes = avg_num_nodes or AVG_NUM_NODES
        self.use_energy_lin_ref = use_energy_lin_ref
        self.load_energy_lin_ref = load_energy_lin_ref
        self.layout = SphericalLayout(lmax, mmax)

        self.sphere_embedding = nn.Embedding(max_num_elements, sphere_channels)
        self.distance_expansion = GaussianBasis(0.0, max_radius, num_distance_basis, 2.0)
        radial_channels = attach_element_embeddings(
            self,
            share_atom_edge_embedding,
            max_num_elements,
            [num_distance_basis, edge_channels, edge_channels],
        )
        block_atom_edge_embedding = use_atom_edge_embedding and not share_atom_edge_embedding

        self.edge_grid = S2Grid(self.layout, grid_resolution, edge_layout=True)
        self.node_grid = S2Grid(SphericalLayout(lmax, lmax), grid_resolution, edge_layout=False)

        self.edge_degree_embedding = EdgeDegreeEmbedding(
            lmax, sphere_channels, max_num_elements, radial_channels,
            block_atom_edge_embedding, avg_degree or AVG_DEGREE,
        )  # fmt: skip

        self.weight_init = weight_init
        self._attention_args = (
            self.layout, self.edge_grid, sphere_channels, attn_hidden_channels, num_heads,
            attn_alpha_channels, attn_value_channels,
        )  # fmt: skip
        self._attention_options = (
            max_num_elements, radial_channels, block_atom_edge_embedding, use_m_share_rad,
            use_attn_renorm, use_gate_act, use_sep_s2_act,
        )  # fmt: skip
        self._feed_forward_args = (lmax, self.node_grid, sphere_channels, ffn_hidden_channels)
        self._feed_forward_options = (use_gate_act, use_grid_mlp, use_sep_s2_act)
        attention, feed_forward = self.attention, self.feed_forward

        self.blocks = nn.ModuleList(
            TransformerBlock(
                attention(sphere_channels, alpha_drop),
                feed_forward(sphere_channels),
                norm_type,
                lmax,
                sphere_channels,
                drop_path_rate,
                proj_drop,
            )  # fmt: skip
            for _ in range(num_layers)
        )
        self.norm = equivariant_norm(norm_type, lmax, sphere_channels)
        self.heads_pending = True  # heads built by add_heads are initialised with the backbone
        self.add_heads()
        self.heads_pending = False
        if load_energy_lin_ref:
            self.energy_lin_ref = nn.Parameter(torch.zeros(max_num_elements), requires_grad=False)
        init_weights(self, weight_init)

    def add_heads(self) -> None:
        """Where a composite model adds its heads (none in the bare backbone): they are then
        initialised together with the backbone, in one pass (the released random stream)."""

    DROPOUT_KEYS = ("alpha_drop", "drop_path_rate", "proj_drop")  # constructor keys of dropouts in interact

    def interaction_norm(self) -> nn.Module:
        """A new norm for the blocks' state ``[N, K, C]`` (a DEQ's injection and fixed-point norms):
        ``layer_norm_sh`` whatever ``norm_type`` the blocks use."""
        return equivariant_norm("layer_norm_sh", self.layout.lmax, self.norm.num_channels)

    @property
    def interaction_blocks(self) -> nn.ModuleList:
        """The modules ``interact`` runs."""
        return self.blocks

    @property
    def energy_head_class(self) -> type:
        from .heads import EquiformerV2EnergyHead

        return EquiformerV2EnergyHead

    def attention(
        self, output_channels: int, alpha_drop: float, output_degree: int | None = None
    ) -> SO2GraphAttention:
        """A new graph attention of this backbone's sizes, ``[N, K, C] -> [N, K, output_channels]``
        (only degree ``output_degree`` when given)."""
        return SO2GraphAttention(
            *self._attention_args, output_channels, *self._attention_options, alpha_drop, output_degree
        )

    def feed_forward(self, output_channels: int) -> FeedForward:
        """A new feed-forward network of this backbone's sizes, ``[N, K, C] -> [N, K, output_channels]``."""
        return FeedForward(*self._feed_forward_args, output_channels, *self._feed_forward_options)

    def _edge_rotation(self, edge_vec: torch.Tensor) -> EdgeRotation:
        """Per-edge frames: deterministic, from the edge vectors ``[E, 3]``."""
        return EdgeRotation.from_edge_vectors(edge_vec, self.layout)

    @property
    def conservative(self) -> bool:
        """Whether the forces are the energy's gradient (then computed even under no_grad)."""
        return self.regress_forces and not self.direct_forces

    def embed(self, data) -> tuple[torch.Tensor, EquiformerV2State]:
        """Checks, graph, edge frames, and the atom plus edge-degree embeddings ``[N, K, C]``."""
        pos, strain = gradient_inputs(data, self.conservative, self.regress_stress)
        atomic_numbers = data.atomic_numbers.long()
        check_structures(
            atomic_numbers, pos, data.natoms, self.max_num_elements,
            cell=data.cell if self.use_pbc else None, sid=getattr(data, "sid", None),
        )  # fmt: skip
        graph = build_graph(self, data, pos)
        edge_index = graph.edge_index  # [2, E]
        edge_vec = strained(graph.edge_vec, strain, data.batch[edge_index[0]])  # [E, 3]
        edge_scalars = self.distance_expansion(edge_vec.norm(dim=-1))  # [E, num_distance_basis]
        edges = EdgeContext(
            edge_index=edge_index,
            edge_scalars=edge_scalars,
            source_z=atomic_numbers[edge_index[0]],
            target_z=atomic_numbers[edge_index[1]],
            rotation=self._edge_rotation(edge_vec),
            num_nodes=len(atomic_numbers),
        )
        edges.edge_scalars = with_element_embeddings(
            edge_scalars, self.source_embedding, self.target_embedding, edges
        )
        x = self.edge_degree_embedding(edges)  # [N, K, C]
        x = torch.cat([x[:, :1] + self.sphere_embedding(atomic_numbers)[:, None], x[:, 1:]], dim=1)
        return x, EquiformerV2State(edges, pos, strain)

    def interact(self, x: torch.Tensor, state: EquiformerV2State, data) -> torch.Tensor:
        """The transformer blocks, ``[N, K, C] -> [N, K, C]``, in the model's ``precision``."""
        with precision_scope(self.precision, x.device):
            for block in self.blocks:
                x = block(x, state.edges, data.batch, len(data.natoms))
        return x

    def readout(self, x: torch.Tensor, state: EquiformerV2State, data) -> dict[str, torch.Tensor]:
        """The final norm, and the embeddings the heads read."""
        emb = {"node_embedding": self.norm(x), "graph": state.edges, "pos": state.pos, "strain": state.strain}
        if self.use_energy_lin_ref:
            # E_DFT = E_std * (E_hat + E_ref / E_std) + E_mean: the model stores E_ref / E_std
            emb["node_energy_reference"] = self.energy_lin_ref[data.atomic_numbers.long()]
        return emb

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        x, state = self.embed(data)
        return self.readout(self.interact(x, state, data), state, data)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay (the official rule): biases of linear layers
        and every parameter of a normalisation layer."""
        return weight_decay_exempt(self, (nn.Linear, SO3Linear), (nn.LayerNorm, *NORMS.values()))
