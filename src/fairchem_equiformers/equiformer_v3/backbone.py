"""The EquiformerV3 backbone (Liao et al., arXiv:2604.09130): embeddings, transformer blocks
and the final norm; its heads are in ``heads.py``, the composite model in ``model.py``.

Differences from the official implementation (atomicarchitects/equiformer_v3), none of which
changes the function computed: the edge frame is a deterministic function of the edge vector
(the official code draws the rotation about the edge axis at random), and in gradient mode
the frames of edges along +-y keep their gradient (the official code detaches them); the
per-degree radial weights multiply after the rotation into the edge frame (a rotation never
mixes degrees); rotations are the package's fused gather-and-rotate; the official ``*_mem``
activations with a projection bug compute what their names say (``activations.py``). Attribute
names follow the official checkpoints, which load strictly (``checkpoint.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad
from fairchem.core.models.base import BackboneInterface, GraphModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

from fairchem_equiformers.heads import check_gradient_outputs, gradient_inputs, strained
from fairchem_equiformers.primitives import (
    NORMS,
    EdgeRotation,
    GaussianBasis,
    Graph,
    PolynomialEnvelope,
    RadialMLP,
    S2Grid,
    SO3Linear,
    SphericalLayout,
    build_graph,
    check_common_model_keys,
    check_precision,
    check_structures,
    precision_scope,
    weight_decay_exempt,
)

from .activations import check_activation
from .attention import EdgesV3, EquivariantGraphAttention
from .block import NORM_TYPES, EdgeDegreeEmbedding, TransformerBlockV3, norm_v3
from .feed_forward import FeedForwardV3

# Statistics of OC20 IS2RE 100k (max_radius 5, max_neighbors 100): the official defaults.
AVG_NUM_NODES = 77.81317
AVG_DEGREE = 23.395238876342773


def init_weights_v3(module: nn.Module) -> None:
    """The official initialisation, after construction: biases of linear layers zero, LayerNorms
    the identity, the radial MLPs' linear weights U(+-1/sqrt(fan_in))."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, SO3Linear)) and layer.bias is not None:
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        if isinstance(layer, RadialMLP):
            for linear in layer.modules():
                if isinstance(linear, nn.Linear):
                    bound = 1 / linear.in_features**0.5
                    nn.init.uniform_(linear.weight, -bound, bound)


@dataclass
class EquiformerV3State:
    """What ``embed`` hands to ``interact`` and ``readout``."""

    edges: EdgesV3
    pos: torch.Tensor
    strain: torch.Tensor | None


def _resolution(name: str, value) -> list[int]:
    value = list(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{name}={value!r}: give [latitude, longitude] grid points, e.g. [20, 8]")
    return value


@registry.register_model("fairchem_equiformers.EquiformerV3Backbone")
class EquiformerV3Backbone(nn.Module, GraphModelMixin, BackboneInterface):
    """The EquiformerV3 backbone: ``forward(data)`` returns ``{"node_embedding": [N, K, C]``
    (after the final norm), ``"graph"`` (the ``EdgesV3``), ``"pos"``, ``"strain"``}. Its heads:
    ``EquiformerV3EnergyHead``, ``EquiformerV3ForceHead``, ``EquiformerV3StressHead``, or the
    shared ``GradientHead``.

    Takes the model-section keys of the official configs (``equiformer_v3``) with the same
    meaning and defaults. ``direct_prediction``: ``True`` predicts forces (and the stress) with
    heads; ``False`` returns positions (and a strain with ``regress_stress``) that require grad,
    for ``-dE/dpos`` forces and ``(1/V) dE/d(strain)`` stress. ``use_head_reg`` has no effect
    (as in the official model, where it is a placeholder). A value the model cannot honour
    (an unknown norm or activation name, ``use_grid_mlp`` with a non-grid activation, a
    ``gradient_checkpointing_block_list`` of the wrong length) is a ``ValueError`` naming the key.

    ``precision`` (this package's key): ``"fp32"`` (default) or ``"bf16"``: the transformer blocks
    and the direct force and stress heads under bf16 autocast (``primitives.precision_scope``);
    edge frames, embeddings, the energy and its sum over atoms in float32.
    """

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        otf_graph: bool = True,
        regress_forces: bool = True,
        regress_stress: bool = False,
        direct_prediction: bool = True,
        max_neighbors: int = 20,
        max_radius: float = 12.0,
        num_radial_basis: int = 600,
        max_num_elements: int = 128,
        num_layers: int = 12,
        num_channels: int = 128,
        attn_hidden_channels: int = 64,
        num_heads: int = 8,
        attn_alpha_channels: int = 32,
        attn_value_channels: int = 16,
        ffn_hidden_channels: int = 128,
        norm_type: str = "merge_layer_norm",
        lmax: int = 6,
        mmax: int = 2,
        attn_grid_resolution_list: list[int] = (20, 8),
        ffn_grid_resolution_list: list[int] = (20, 20),
        edge_channels: int = 128,
        use_atom_edge_embedding: bool = True,
        use_envelope: bool = True,
        attn_activation: str = "sep-merge_gates2_swiglu",
        use_attn_renorm: bool = True,
        use_add_merge: bool = False,
        use_rad_l_parametrization: bool = True,
        softcap: float | None = None,
        attn_eps: float = 1e-16,
        ffn_activation: str = "sep-merge_gates2_swiglu",
        use_grid_mlp: bool = True,
        use_gate_force_head: bool = True,
        alpha_drop: float = 0.0,
        attn_mask_rate: float = 0.0,
        attn_weights_drop: float = 0.1,
        value_drop: float = 0.0,
        drop_path_rate: float = 0.05,
        proj_drop: float = 0.0,
        ffn_drop: float = 0.0,
        use_head_reg: bool = False,
        gradient_checkpointing_block_list: list[int] | None = None,
        avg_num_nodes: float = AVG_NUM_NODES,
        avg_degree: float = AVG_DEGREE,
        enforce_max_neighbors_strictly: bool = True,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        check_common_model_keys(
            use_pbc=use_pbc, use_pbc_single=use_pbc_single, otf_graph=otf_graph,
            regress_forces=regress_forces, enforce_max_neighbors_strictly=enforce_max_neighbors_strictly,
            max_neighbors=max_neighbors, max_radius=max_radius, max_num_elements=max_num_elements,
        )  # fmt: skip
        if norm_type not in NORM_TYPES:
            raise ValueError(
                f"norm_type={norm_type!r} is not an EquiformerV3 norm; allowed: {list(NORM_TYPES)}"
            )
        check_activation(attn_activation, "attn_activation")
        check_activation(ffn_activation, "ffn_activation")
        if not 0 <= mmax <= lmax or lmax < 1:
            raise ValueError(f"need 1 <= lmax and 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        if regress_stress and direct_prediction and lmax < 2:
            raise ValueError(
                "the direct stress head reads degree 2: regress_stress with direct_prediction needs lmax >= 2"
            )
        if not direct_prediction:
            check_gradient_outputs(regress_forces, False, regress_stress, use_pbc)
        if gradient_checkpointing_block_list is None:
            gradient_checkpointing_block_list = [0] * num_layers
        if len(gradient_checkpointing_block_list) != num_layers or set(gradient_checkpointing_block_list) - {
            0,
            1,
        }:
            raise ValueError(
                f"gradient_checkpointing_block_list={gradient_checkpointing_block_list!r}: one 0 or 1 per "
                f"layer ({num_layers} layers)"
            )
        if use_head_reg:
            logging.info("use_head_reg has no effect in EquiformerV3 (as in the official model)")

        self.use_pbc, self.use_pbc_single, self.otf_graph = use_pbc, use_pbc_single, otf_graph
        self.regress_forces, self.regress_stress = regress_forces, regress_stress
        check_precision(precision)
        self.precision = precision
        self.direct_prediction = direct_prediction
        self.direct_forces = direct_prediction  # the name the package's gradient head reads
        self.max_neighbors, self.max_radius, self.cutoff = max_neighbors, max_radius, max_radius
        self.max_num_elements = max_num_elements
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.avg_num_nodes, self.avg_degree = avg_num_nodes, avg_degree
        self.num_channels, self.norm_type = num_channels, norm_type
        self.gradient_checkpointing_block_list = list(gradient_checkpointing_block_list)
        self.layout = SphericalLayout(lmax, mmax)
        self.use_gate_force_head = use_gate_force_head

        self.sphere_embedding = nn.Embedding(max_num_elements, num_channels)
        self.distance_expansion = GaussianBasis(0.0, max_radius, num_radial_basis, 2.0)
        self.envelope = PolynomialEnvelope(5) if use_envelope else None
        self.attn_grid = S2Grid(
            self.layout, _resolution("attn_grid_resolution_list", attn_grid_resolution_list), True
        )
        self.ffn_grid = S2Grid(
            SphericalLayout(lmax, lmax),
            _resolution("ffn_grid_resolution_list", ffn_grid_resolution_list),
            False,
        )
        self.edge_degree_embedding = EdgeDegreeEmbedding(
            lmax,
            num_channels,
            max_num_elements,
            num_radial_basis,
            edge_channels,
            use_atom_edge_embedding,
            avg_degree,
        )
        self._attention_args = dict(
            layout=self.layout, grid=self.attn_grid, in_channels=num_channels,
            hidden_channels=attn_hidden_channels,
            num_heads=num_heads, alpha_channels=attn_alpha_channels, value_channels=attn_value_channels,
            max_num_elements=max_num_elements, num_radial_basis=num_radial_basis, edge_channels=edge_channels,
            use_atom_edge_embedding=use_atom_edge_embedding, use_attn_renorm=use_attn_renorm,
            rms_alpha_norm="rms_norm" in norm_type, use_add_merge=use_add_merge,
            use_rad_l_parametrization=use_rad_l_parametrization, softcap=softcap, eps=attn_eps,
        )  # fmt: skip
        self.ffn_hidden_channels = ffn_hidden_channels
        self.blocks = nn.ModuleList(
            TransformerBlockV3(
                EquivariantGraphAttention(
                    **self._attention_args,
                    out_channels=num_channels,
                    activation=attn_activation,
                    alpha_drop=alpha_drop,
                    attn_mask_rate=attn_mask_rate,
                    attn_weights_drop=attn_weights_drop,
                    value_drop=value_drop,
                ),
                FeedForwardV3(
                    lmax,
                    self.ffn_grid,
                    num_channels,
                    ffn_hidden_channels,
                    num_channels,
                    ffn_activation,
                    use_grid_mlp,
                    ffn_drop,
                ),
                norm_type,
                lmax,
                num_channels,
                drop_path_rate,
                proj_drop,
            )  # fmt: skip
            for _ in range(num_layers)
        )
        self.norm = norm_v3(norm_type, lmax, num_channels)
        self._heads_done = False  # heads built by add_heads are initialised with the backbone
        self.add_heads()
        init_weights_v3(self)
        self._heads_done = True

    def add_heads(self) -> None:
        """Where a composite model adds its heads (none in the bare backbone), before the one
        initialisation pass."""

    DROPOUT_KEYS = (
        "alpha_drop", "attn_mask_rate", "attn_weights_drop", "value_drop", "drop_path_rate", "proj_drop",
        "ffn_drop",
    )  # fmt: skip

    def interaction_norm(self) -> nn.Module:
        """A new norm for the blocks' state ``[N, K, C]`` (a DEQ's injection and fixed-point norms)."""
        return norm_v3(self.norm_type, self.layout.lmax, self.num_channels)

    @property
    def interaction_blocks(self) -> nn.ModuleList:
        return self.blocks

    @property
    def energy_head_class(self) -> type:
        from .heads import EquiformerV3EnergyHead

        return EquiformerV3EnergyHead

    @property
    def conservative(self) -> bool:
        """Whether the forces are the energy's gradient (then computed even under no_grad)."""
        return self.regress_forces and not self.direct_prediction

    def attention(self, out_channels: int, activation: str) -> EquivariantGraphAttention:
        """A new graph attention of this backbone's sizes without dropout (the force head's)."""
        return EquivariantGraphAttention(
            **self._attention_args, out_channels=out_channels, activation=activation
        )

    def feed_forward(self, out_channels: int, activation: str) -> FeedForwardV3:
        """A new feed-forward network of this backbone's sizes without grid MLP (the stress head's)."""
        return FeedForwardV3(
            self.layout.lmax,
            self.ffn_grid,
            self.num_channels,
            self.ffn_hidden_channels,
            out_channels,
            activation,
            False,
        )

    @torch._dynamo.disable
    def graph_inputs(self, data) -> tuple[torch.Tensor, torch.Tensor | None, Graph]:
        """Input checks, the positions (and strain) to differentiate, and the neighbour search:
        data-dependent, so ``torch.compile`` leaves them to eager mode. Called first in
        ``forward``: the one graph break is there, and the compiled rest sees only tensors."""
        stress = self.regress_stress and not self.direct_prediction
        pos, strain = gradient_inputs(data, self.conservative, stress)
        check_structures(
            data.atomic_numbers.long(), pos, data.natoms, self.max_num_elements,
            cell=data.cell if self.use_pbc else None, sid=getattr(data, "sid", None),
        )  # fmt: skip
        return pos, strain, build_graph(self, data, pos)

    def embed(self, data, inputs=None) -> tuple[torch.Tensor, EquiformerV3State]:
        """Edge frames and the atom plus edge-degree embeddings ``[N, K, C]``, on the
        ``graph_inputs`` (computed here unless given)."""
        if inputs is None:
            inputs = self.graph_inputs(data)
        pos, strain, graph = inputs
        atomic_numbers = data.atomic_numbers.long()
        edge_index = graph.edge_index  # [2, E]
        edge_vec = strained(graph.edge_vec, strain, data.batch[edge_index[0]])  # [E, 3]
        distance = edge_vec.norm(dim=-1)  # [E]
        edges = EdgesV3(
            edge_index=edge_index,
            edge_scalars=self.distance_expansion(distance),  # [E, num_radial_basis]
            source_z=atomic_numbers[edge_index[0]],
            target_z=atomic_numbers[edge_index[1]],
            rotation=self._edge_rotation(edge_vec),  # geometry in the input's precision, also under autocast
            envelope=None if self.envelope is None else self.envelope(distance / self.max_radius)[:, None],
            num_nodes=len(atomic_numbers),
        )
        x = self.edge_degree_embedding(edges)  # [N, K, C]
        x = torch.cat([x[:, :1] + self.sphere_embedding(atomic_numbers)[:, None], x[:, 1:]], dim=1)
        return x, EquiformerV3State(edges, pos, strain)

    def _edge_rotation(self, edge_vec: torch.Tensor) -> EdgeRotation:
        """Per-edge frames: deterministic, from the edge vectors ``[E, 3]``."""
        with torch.autocast(edge_vec.device.type, enabled=False):
            return EdgeRotation.from_edge_vectors(edge_vec, self.layout)

    def interact(self, x: torch.Tensor, state: EquiformerV3State, data) -> torch.Tensor:
        """The transformer blocks, ``[N, K, C] -> [N, K, C]`` (blocks marked in
        ``gradient_checkpointing_block_list`` recompute their activations in the backward)."""
        num_graphs = len(data.natoms)
        with precision_scope(self.precision, x.device):
            for block, recompute in zip(self.blocks, self.gradient_checkpointing_block_list):
                if recompute and torch.is_grad_enabled():
                    x = checkpoint(block, x, state.edges, data.batch, num_graphs, use_reentrant=False)
                else:
                    x = block(x, state.edges, data.batch, num_graphs)
        return x

    def readout(self, x: torch.Tensor, state: EquiformerV3State, data) -> dict:
        return {
            "node_embedding": self.norm(x),
            "graph": state.edges,
            "pos": state.pos,
            "strain": state.strain,
        }

    def embeddings(self, data, inputs=None) -> dict:
        """``embed``, ``interact`` and ``readout``, on the ``graph_inputs`` (computed unless given)."""
        x, state = self.embed(data, inputs)
        return self.readout(self.interact(x, state, data), state, data)

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict:
        inputs = self.graph_inputs(data)  # alone: the graph break (see EquiformerV3.forward)
        return self.embeddings(data, inputs)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The official rule: every parameter of embeddings, normalisation layers and
        RMSNorms, and the biases of linear layers, are exempt from weight decay."""
        whole = (nn.Embedding, nn.LayerNorm, nn.RMSNorm, *NORMS.values())
        return weight_decay_exempt(self, (nn.Linear, SO3Linear), whole)
