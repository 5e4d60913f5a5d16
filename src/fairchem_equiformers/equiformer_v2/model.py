"""EquiformerV2 (Liao, Wood, Das, Smidt; arXiv:2306.12059), as a drop-in for the released
OC20/OC22 models.

Differences from fairchem 1.10's implementation, none of which changes the function computed:
the edge frame is a deterministic function of the edge vector (the reference draws the
rotation about the edge axis at random); Wigner matrices are kept per degree and only for the
orders that survive the ``mmax`` truncation; coefficient re-orderings are index operations; the
model runs in float64. Attribute names follow the released checkpoints, whose flat layout (any
number of ``module.`` prefixes, duplicated per-block buffers) and fairchem's backbone+heads
layout both load (see ``checkpoint.py``).

Beyond the released model: conservative forces ``-dE/dpos`` (``direct_forces=False``; the
edge frames are differentiable, nothing is detached) and the stress ``(1/V) dE/d(strain)`` of
periodic systems (``regress_stress``), as fairchem's eSEN computes them.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad
from fairchem.core.models.base import GraphModelMixin
from torch import nn

from fairchem_equiformers.primitives import (
    NORMS,
    EdgeRotation,
    GaussianBasis,
    RadialMLP,
    S2Grid,
    SO3Linear,
    SphericalLayout,
    check_common_model_keys,
    check_structures,
    equivariant_norm,
    radius_graph_nonperiodic,
)

from .attention import EdgeContext, SO2GraphAttention, attach_element_embeddings, with_element_embeddings
from .block import EdgeDegreeEmbedding, TransformerBlock
from .checkpoint import register_checkpoint_compatibility
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


@registry.register_model("fairchem_equiformers.EquiformerV2")
class EquiformerV2(nn.Module, GraphModelMixin):
    """EquiformerV2 energy and force model.

    Takes the model-section keys of the released configs (fairchem's ``equiformer_v2``).
    ``forward(data)`` returns ``{"energy": [B], "forces": [N, 3]}`` (forces only with
    ``regress_forces``), plus ``"stress": [B, 9]`` with ``regress_stress``.

    ``direct_forces`` (the name fairchem's newer models use): ``True`` (released) predicts the
    forces with a force head; ``False`` builds no force head and returns ``-dE/dpos`` (with
    ``create_graph`` in training mode, so force losses train the energy model). Released
    checkpoints load into a ``direct_forces=False`` model: their force head is skipped with a
    warning (see ``checkpoint.py``). ``regress_stress`` (needs ``direct_forces=False``,
    ``regress_forces`` and ``use_pbc``) adds the stress ``(1/V) dE/d(strain)`` in eV/A^3, ASE's
    sign, row-major 3x3 per graph as fairchem's eSEN returns it.

    Args (beyond the released names): ``num_distance_basis`` is honoured (fairchem ignores it
    and always uses 600 Gaussians, so the default here is 600; released configs say 512 and
    must say 600 to load released checkpoints). ``num_sphere_samples`` has no effect in
    EquiformerV2 in any implementation; it is accepted only so released configs load.
    ``attn_activation``/``ffn_activation`` accept only ``"silu"`` (what the released model
    computes whatever they say); ``use_s2_act_attn`` only ``False``; ``distance_function``
    only ``"gaussian"``; ``lmax_list``/``mmax_list`` a single resolution.
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
        if regress_stress and (direct_forces or not regress_forces or not use_pbc):
            raise ValueError(
                "regress_stress=True needs direct_forces=False and regress_forces=True (the stress is "
                "the strain derivative of the energy, computed with the forces) and use_pbc=True "
                f"(it needs a cell); got direct_forces={direct_forces}, regress_forces={regress_forces}, "
                f"use_pbc={use_pbc}"
            )
        if num_sphere_samples is not None:
            logging.info("num_sphere_samples has no effect in EquiformerV2 (accepted for released configs)")

        self.use_pbc = use_pbc
        self.use_pbc_single = use_pbc_single
        self.regress_forces = regress_forces
        self.direct_forces = direct_forces
        self.regress_stress = regress_stress
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

        def attention(output_channels: int, alpha_drop: float, output_degree: int | None = None):
            return SO2GraphAttention(
                self.layout, self.edge_grid, sphere_channels, attn_hidden_channels, num_heads,
                attn_alpha_channels, attn_value_channels, output_channels, max_num_elements,
                radial_channels, block_atom_edge_embedding, use_m_share_rad, use_attn_renorm,
                use_gate_act, use_sep_s2_act, alpha_drop, output_degree,
            )  # fmt: skip

        def feed_forward(output_channels: int) -> FeedForward:
            return FeedForward(
                lmax, self.node_grid, sphere_channels, ffn_hidden_channels, output_channels,
                use_gate_act, use_grid_mlp, use_sep_s2_act,
            )  # fmt: skip

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
        self.energy_block = feed_forward(1)
        # the forces are the degree-1 output: the head computes nothing else
        self.force_block = attention(1, 0.0, output_degree=1) if regress_forces and direct_forces else None
        if load_energy_lin_ref:
            self.energy_lin_ref = nn.Parameter(torch.zeros(max_num_elements), requires_grad=False)

        self._init_weights(weight_init)
        register_checkpoint_compatibility(self)

    def _init_weights(self, weight_init: str) -> None:
        """Released initialisation: linear weights N(0, 1/fan_in) (``normal``) or
        U(+-1/sqrt(fan_in)) (``uniform``), radial MLPs always uniform, biases zero."""
        radial_linears = {id(m) for r in self.modules() if isinstance(r, RadialMLP) for m in r.modules()}
        for module in self.modules():
            if isinstance(module, (nn.Linear, SO3Linear)):
                bound = 1 / math.sqrt(module.in_features)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                if id(module) in radial_linears:
                    nn.init.uniform_(module.weight, -bound, bound)
                elif weight_init == "normal":
                    nn.init.normal_(module.weight, 0.0, bound)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _edges(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge index ``[2, E]`` (source, target) and vectors source - target ``[E, 3]``.

        Periodic graphs come from fairchem's neighbour search, which only runs in float32;
        in other precisions the vectors are recomputed from its cell offsets."""
        if not self.use_pbc and self.otf_graph:
            edge_index = radius_graph_nonperiodic(data.pos, data.batch, self.max_radius, self.max_neighbors)
            return edge_index, data.pos[edge_index[0]] - data.pos[edge_index[1]]
        search_input = data
        if self.use_pbc and data.pos.dtype != torch.float32:
            search_input = copy.copy(data)
            # the search only picks the edges; their vectors are recomputed below
            search_input.pos, search_input.cell = data.pos.detach().float(), data.cell.detach().float()
        graph = self.generate_graph(
            search_input,
            enforce_max_neighbors_strictly=self.enforce_max_neighbors_strictly,
            use_pbc_single=self.use_pbc_single,
        )
        if search_input is data:
            return graph.edge_index, graph.edge_distance_vec
        source, target = graph.edge_index
        cells = data.cell[data.batch[source]]  # [E, 3, 3]
        offsets = torch.einsum("ei,eij->ej", graph.cell_offsets.to(data.pos.dtype), cells)
        return graph.edge_index, data.pos[source] - data.pos[target] + offsets

    def _edge_rotation(self, edge_vec: torch.Tensor) -> EdgeRotation:
        """Per-edge frames: deterministic, from the edge vectors ``[E, 3]``."""
        return EdgeRotation.from_edge_vectors(edge_vec, self.layout)

    def _interact(self, x: torch.Tensor, edges: EdgeContext, data) -> torch.Tensor:
        """The transformer blocks, ``[N, K, C] -> [N, K, C]`` (``DEQEquiformerV2`` replaces the
        stack by the fixed point of its blocks)."""
        for block in self.blocks:
            x = block(x, edges, data.batch, len(data.natoms))
        return x

    @property
    def conservative(self) -> bool:
        """Whether the forces are the energy's gradient (then computed even under no_grad)."""
        return self.regress_forces and not self.direct_forces

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        if self.conservative and not data.pos.requires_grad:
            data = copy.copy(data)  # the caller's positions stay as they are
            data.pos = data.pos.detach().requires_grad_()
        atomic_numbers = data.atomic_numbers.long()
        natoms = data.natoms
        check_structures(
            atomic_numbers, data.pos, natoms, self.max_num_elements,
            cell=data.cell if self.use_pbc else None, sid=getattr(data, "sid", None),
        )  # fmt: skip
        num_graphs, num_nodes = len(natoms), len(atomic_numbers)
        batch = data.batch

        edge_index, edge_vec = self._edges(data)  # [2, E], [E, 3]
        if self.regress_stress:
            # positions and cell both strained by (1 + symmetric strain): so are the edge vectors
            strain = edge_vec.new_zeros(num_graphs, 3, 3, requires_grad=True)
            symmetric_strain = 0.5 * (strain + strain.transpose(1, 2))  # [B, 3, 3]
            edge_strain = symmetric_strain[batch[edge_index[0]]]  # [E, 3, 3]
            edge_vec = edge_vec + torch.einsum("ei,eij->ej", edge_vec, edge_strain)
        edge_scalars = self.distance_expansion(edge_vec.norm(dim=-1))  # [E, num_distance_basis]
        edges = EdgeContext(
            edge_index=edge_index,
            edge_scalars=edge_scalars,
            source_z=atomic_numbers[edge_index[0]],
            target_z=atomic_numbers[edge_index[1]],
            rotation=self._edge_rotation(edge_vec),
            num_nodes=num_nodes,
        )
        edges.edge_scalars = with_element_embeddings(
            edge_scalars, self.source_embedding, self.target_embedding, edges
        )

        x = self.edge_degree_embedding(edges)  # [N, K, C]
        x = torch.cat([x[:, :1] + self.sphere_embedding(atomic_numbers)[:, None], x[:, 1:]], dim=1)
        x = self._interact(x, edges, data)
        x = self.norm(x)

        node_energy = self.energy_block(x)[:, 0, 0]  # [N]
        energy = node_energy.new_zeros(num_graphs).index_add_(0, batch, node_energy)
        energy = energy / self.avg_num_nodes
        if self.use_energy_lin_ref:
            # E_DFT = E_std * (E_hat + E_ref / E_std) + E_mean: the model stores E_ref / E_std
            reference = self.energy_lin_ref[atomic_numbers].to(energy.dtype)
            energy = energy.index_add(0, batch, reference)
        outputs = {"energy": energy}
        if self.conservative:
            inputs = [data.pos, strain] if self.regress_stress else [data.pos]
            gradients = torch.autograd.grad(
                energy.sum(), inputs, create_graph=self.training, allow_unused=True, materialize_grads=True
            )
            outputs["forces"] = -gradients[0]  # [N, 3]
            if self.regress_stress:
                volume = torch.linalg.det(data.cell).abs()  # [B]
                outputs["stress"] = (gradients[1] / volume[:, None, None]).reshape(num_graphs, 9)
        elif self.regress_forces:
            outputs["forces"] = self.force_block(x, edges)[:, :, 0].contiguous()  # [N, 3]
        return outputs

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay (the official rule): biases of linear layers
        and every parameter of a normalisation layer."""
        norms = (nn.LayerNorm, *NORMS.values())
        exempt = set()
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                is_linear = isinstance(module, (nn.Linear, SO3Linear))
                if (is_linear and param_name != "weight") or isinstance(module, norms):
                    exempt.add(f"{module_name}.{param_name}" if module_name else param_name)
        return exempt
