"""The Equiformer (V1) backbone (Liao & Smidt, ICLR 2023, arXiv:2206.11990; reference code
atomicarchitects/equiformer): embeddings, transformer blocks and the final norm. Its heads are in
``heads.py``, the composite model in ``model.py``.

Architecture as in the reference: atom-type embedding plus edge-degree embedding, pre-norm
transformer blocks (equivariant layer norm, equivariant graph attention, gate FFN, graph
drop-path), the last block mapping to ``irreps_feature``, then a final norm. Spherical harmonics
are declared even (``1x0e+1x1e+...``) as in the reference's SE(3) models: the model is equivariant
to rotations, not to reflections.

Deviations from the reference, none of which changes what the model can represent: e3nn 0.6's
``o3.Linear``/``o3.TensorProduct`` normalise by fan-in in the forward pass where the reference
rescales the initial weights; the atom embedding is an ``nn.Embedding`` (the reference's one-hot
linear layer with a bias that only adds a constant); the edge-degree embedding starts from
scalars only (see ``EdgeDegreeEmbedding``); the ``gaussian`` radial basis is the shared fixed
``GaussianBasis`` (the reference trains the centres and widths of its Gaussians); the
``dot_product`` variant is this package's reading of the paper's ablation (query from the
target, key and value from the message).

Beyond the reference: conservative forces ``-dE/dpos`` and the stress ``(1/V) dE/d(strain)`` of
periodic systems (``regress_stress``), through the shared gradient head (``heads/gradient.py``).
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
    BesselBasis,
    ExpNormalBasis,
    GaussianBasis,
    IrrepsLayerNorm,
    build_graph,
    check_common_model_keys,
    check_structures,
    e3nn_eager,
    is_even_scalar,
    restore_exact_wigner_3j,
    weight_decay_exempt,
)

from .attention import ATTENTION_TYPES, EdgeFeatures, EquivariantGraphAttention
from .blocks import EdgeDegreeEmbedding, TransformerBlock
from .heads import HEADS

# Statistics of QM9 with a 5 A cutoff, which the reference also uses for MD17.
QM9_AVG_NUM_NODES = 18.03065905448718
QM9_AVG_DEGREE = 15.57930850982666
RADIAL_BASES = ("gaussian", "bessel", "exp")


def make_radial_basis(name: str, cutoff: float, num_basis: int) -> nn.Module:
    """The distance expansion ``[E] -> [E, num_basis]`` named ``name`` (one of ``RADIAL_BASES``)."""
    if name == "gaussian":
        return GaussianBasis(0.0, cutoff, num_basis, width_factor=2.0)
    if name == "bessel":
        return BesselBasis(cutoff, num_basis)
    if name == "exp":
        return ExpNormalBasis(cutoff, num_basis)
    raise ValueError(f"radial_basis={name!r} is not one of {RADIAL_BASES}")


def _irreps(name: str, value: str) -> o3.Irreps:
    try:
        irreps = o3.Irreps(value)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"{name}={value!r} is not an e3nn irreps string ({error})") from None
    if not irreps or not is_even_scalar(irreps[0].ir):
        raise ValueError(f"{name}={value!r} must start with even scalars (0e)")
    if irreps != irreps.sort().irreps.simplify():
        raise ValueError(f"{name}={value!r} must be sorted by degree, one block per irrep")
    return irreps


@dataclass
class EquiformerV1State:
    """What ``embed`` hands to ``interact`` and ``readout``: the edges and the positions and
    strain the gradient head differentiates by."""

    edges: EdgeFeatures
    pos: torch.Tensor
    strain: torch.Tensor | None


@registry.register_model("fairchem_equiformers.EquiformerV1Backbone")
class EquiformerV1Backbone(nn.Module, GraphModelMixin, BackboneInterface):
    """The Equiformer (V1) backbone: ``forward(data)`` returns ``{"node_embedding": [N,
    irreps_feature.dim]`` (after the final norm), ``"graph"``: the ``EdgeFeatures``, ``"pos"``,
    ``"strain"``} (see ``fairchem_equiformers.heads``). Its heads (``heads.py``):
    ``EquiformerV1EnergyHead``, ``EquiformerV1DipoleHead``, ``EquiformerV1ForceHead``,
    ``EquiformerV1DisplacementHead``, or the shared ``GradientHead``.

    ``forward`` is ``readout(interact(*embed(data)))``: ``embed`` (checks, graph, atom plus
    edge-degree embeddings ``[N, irreps_node.dim]``), ``interact`` (every transformer block but
    the last, node irreps to node irreps) and ``readout`` (the last block, to ``irreps_feature``,
    then the final norm): the protocol a deep-equilibrium wrapper uses to replace ``interact``
    by the fixed point of ``interaction_blocks`` (normed by ``interaction_norm()``, with the
    ``DROPOUT_KEYS`` off inside the map).

    The defaults are the paper's MD17 L2 model (``graph_attention_transformer_nonlinear_exp_l2_md17``).

    Args:
        use_pbc: periodic graphs (fairchem's neighbour search) or molecules (this package's own
            radius graph; needs neither torch-cluster nor pyg-lib).
        use_pbc_single / enforce_max_neighbors_strictly: passed to fairchem's periodic neighbour
            search (one structure at a time; keep exactly ``max_neighbors`` even when the next
            neighbours are at the same distance), as in fairchem's models.
        regress_forces / direct_forces: forces at all; from a force head (``direct_forces=True``)
            or as ``-dE/dpos`` (``False``: the backbone returns positions that require grad).
        regress_displacement: also predict a per-atom vector, the displacement to the relaxed
            structure (IS2RE with the IS2RS auxiliary task), with an attention head on the final
            features like the direct-force head (the reference's ``auxiliary_head``).
        otf_graph: build the graph on the fly (default); ``False`` uses the edges stored in the
            batch (``edge_index``, and ``cell_offsets``/``neighbors`` with ``use_pbc``), as
            fairchem's ``generate_graph`` does (LMDBs written with ``r_edges=True``).
        max_neighbors / max_radius: graph construction (nearest neighbours within the cutoff, A).
        max_num_elements: size of the atom-type embedding (atomic numbers 1..max_num_elements-1).
        irreps_node_embedding: node features of every block, e.g. ``128x0e+64x1e+32x2e``; its
            highest degree is that of the edge spherical harmonics.
        irreps_head / num_heads: features of one attention head; its even scalars are the
            attention logits' channels.
        irreps_mlp_mid: hidden features of the gate FFN.
        irreps_feature: output of the last block, read by the energy head (and by the vector
            heads; the reference's OC20 auxiliary-task models give it vectors, ``512x0e+256x1e``).
        attention_type: ``mlp_nonlinear`` (paper default), ``mlp_linear`` or ``dot_product``.
        radial_basis / num_radial_basis / radial_hidden_channels: distance expansion (``exp``,
            ``bessel``, ``gaussian``) and the hidden widths of every radial MLP.
        alpha_drop / drop_path_rate: dropout of attention weights; graph drop-path per block.
        avg_num_nodes / avg_degree: the energy sum and the edge-degree sum are divided by their
            square roots.
        head: ``scalar`` (energy-like sum of atomic scalars; any invariant property) or
            ``dipole`` (``sum_i q_i (r_i - centroid) + mu_i`` with neutral charges; molecules only,
            no forces). See ``heads.py``.
        target: name of the predicted property: the output key, which the config's ``outputs``,
            ``loss_functions`` and dataset field use (e.g. ``gap``, ``dipole_moment``). Forces
            (``regress_forces``) are ``-d energy / d pos`` and need ``target="energy"``.
        regress_stress: also return the strain the edge vectors were deformed by, for the stress
            ``(1/V) dE/d(strain)`` (needs ``direct_forces=False``, ``regress_forces`` and
            ``use_pbc``).
    """

    DROPOUT_KEYS = ("alpha_drop", "drop_path_rate")

    @e3nn_eager()
    def __init__(
        self,
        use_pbc: bool = False,
        use_pbc_single: bool = False,
        regress_forces: bool = True,
        direct_forces: bool = False,
        regress_displacement: bool = False,
        otf_graph: bool = True,
        max_neighbors: int = 1000,
        max_radius: float = 5.0,
        max_num_elements: int = 90,
        enforce_max_neighbors_strictly: bool = True,
        num_layers: int = 6,
        irreps_node_embedding: str = "128x0e+64x1e+32x2e",
        irreps_head: str = "32x0e+16x1e+8x2e",
        num_heads: int = 4,
        irreps_mlp_mid: str = "384x0e+192x1e+96x2e",
        irreps_feature: str = "512x0e",
        attention_type: str = "mlp_nonlinear",
        radial_basis: str = "exp",
        num_radial_basis: int = 32,
        radial_hidden_channels: list[int] = (64, 64),
        alpha_drop: float = 0.0,
        drop_path_rate: float = 0.0,
        avg_num_nodes: float = QM9_AVG_NUM_NODES,
        avg_degree: float = QM9_AVG_DEGREE,
        head: str = "scalar",
        target: str = "energy",
        regress_stress: bool = False,
    ) -> None:
        super().__init__()
        check_common_model_keys(
            use_pbc=use_pbc, use_pbc_single=use_pbc_single, otf_graph=otf_graph,
            regress_forces=regress_forces, enforce_max_neighbors_strictly=enforce_max_neighbors_strictly,
            max_neighbors=max_neighbors, max_radius=max_radius, max_num_elements=max_num_elements,
        )  # fmt: skip
        irreps_node = _irreps("irreps_node_embedding", irreps_node_embedding)
        irreps_head = _irreps("irreps_head", irreps_head)
        irreps_mid = _irreps("irreps_mlp_mid", irreps_mlp_mid)
        irreps_feature = _irreps("irreps_feature", irreps_feature)
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type={attention_type!r} is not one of {ATTENTION_TYPES}")
        if num_layers < 1 or num_heads < 1:
            raise ValueError(f"num_layers={num_layers} and num_heads={num_heads} must be at least 1")
        if direct_forces and not regress_forces:
            raise ValueError("direct_forces=True needs regress_forces=True")
        if head not in HEADS:
            raise ValueError(f"head={head!r} is not one of {HEADS}")
        if not isinstance(target, str) or not target.isidentifier():
            raise ValueError(f"target={target!r} must be a property name such as 'energy' or 'gap'")
        if regress_forces and (head, target) != ("scalar", "energy"):
            raise ValueError(
                f"regress_forces=True gives forces as -d energy / d pos: it needs head='scalar' and "
                f"target='energy', got head={head!r}, target={target!r} (set regress_forces: False)"
            )
        if head == "dipole" and regress_displacement:
            raise ValueError("regress_displacement=True needs head='scalar' (IS2RE energy + displacement)")
        if head == "dipole" and use_pbc:
            raise ValueError("head='dipole' needs use_pbc=False: a periodic structure has no defined dipole")
        if type(regress_stress).__name__ not in ("bool", "bool_"):
            raise ValueError(f"regress_stress={regress_stress!r} must be a boolean (true or false)")
        check_gradient_outputs(regress_forces, direct_forces, regress_stress, use_pbc)

        # attributes GraphModelMixin.generate_graph and build_graph read
        self.use_pbc, self.use_pbc_single, self.otf_graph = use_pbc, use_pbc_single, otf_graph
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.max_neighbors, self.max_radius, self.cutoff = max_neighbors, max_radius, max_radius
        self.regress_forces, self.direct_forces = regress_forces, direct_forces
        self.regress_displacement, self.regress_stress = regress_displacement, regress_stress
        self.max_num_elements = max_num_elements
        self.avg_num_nodes = avg_num_nodes
        self.head, self.target = head, target
        self.irreps_node, self.irreps_feature = irreps_node, irreps_feature
        self.irreps_sh = o3.Irreps([(1, (l, 1)) for l in range(irreps_node.lmax + 1)])  # SE(3): all even

        radial_channels = [num_radial_basis, *radial_hidden_channels]
        self._attention_options = (irreps_head, num_heads, radial_channels, attention_type, alpha_drop)
        self.atom_embedding = nn.Embedding(max_num_elements, irreps_node.count("0e"))
        self.distance_expansion = make_radial_basis(radial_basis, max_radius, num_radial_basis)
        self.edge_degree_embedding = EdgeDegreeEmbedding(
            irreps_node, self.irreps_sh, radial_channels, avg_degree
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(
                self.attention(irreps_node, irreps_node),
                irreps_node,
                irreps_mid,
                irreps_feature if i == num_layers - 1 else irreps_node,
                drop_path_rate,
            )
            for i in range(num_layers)
        )
        self.norm = IrrepsLayerNorm(irreps_feature)
        # heads built by add_heads are created with the backbone, in one pass (the same random
        # stream as the model before it was split into a backbone and heads); e3nn initialises
        # every layer when it is built, so no head needs a separate initialisation
        self.heads_pending = True
        self.add_heads()
        self.heads_pending = False

    def add_heads(self) -> None:
        """Where a composite model adds its heads (none in the bare backbone)."""

    def attention_arguments(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps) -> tuple:
        """``EquivariantGraphAttention``'s arguments for a layer of this backbone's sizes."""
        irreps_head, num_heads, radial_channels, attention_type, alpha_drop = self._attention_options
        return (
            irreps_in, self.irreps_sh, irreps_out, irreps_head, num_heads, radial_channels,
            attention_type, alpha_drop,
        )  # fmt: skip

    def attention(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps) -> EquivariantGraphAttention:
        """A new graph attention of this backbone's sizes, ``[N, irreps_in.dim] -> [N, irreps_out.dim]``."""
        return EquivariantGraphAttention(*self.attention_arguments(irreps_in, irreps_out))

    @property
    def energy_head_class(self) -> type:
        from .heads import EquiformerV1EnergyHead

        return EquiformerV1EnergyHead

    @property
    def conservative(self) -> bool:
        """Whether the forces are the energy's gradient (then computed even under no_grad)."""
        return self.regress_forces and not self.direct_forces

    @property
    def interaction_blocks(self) -> nn.ModuleList:
        """The blocks ``interact`` runs: all but the last (node irreps to node irreps)."""
        return self.blocks[:-1]

    def interaction_norm(self) -> nn.Module:
        """A new equivariant layer norm on the node irreps (the norm a fixed-point map puts on its
        state)."""
        return IrrepsLayerNorm(self.irreps_node)

    def embed(self, data) -> tuple[torch.Tensor, EquiformerV1State]:
        """Checks, graph, and the atom plus edge-degree embeddings ``[N, irreps_node.dim]``."""
        pos, strain = gradient_inputs(data, forces=self.conservative, stress=self.regress_stress)
        atomic_numbers = data.atomic_numbers.long()
        check_structures(
            atomic_numbers, pos, data.natoms, self.max_num_elements,
            cell=data.cell if self.use_pbc else None, sid=getattr(data, "sid", None),
        )  # fmt: skip
        graph = build_graph(self, data, pos)
        edge_index = graph.edge_index  # [2, E]
        edge_vec = strained(graph.edge_vec, strain, data.batch[edge_index[0]])  # [E, 3]
        edges = EdgeFeatures(
            source=edge_index[0],
            target=edge_index[1],
            sh=o3.spherical_harmonics(self.irreps_sh, edge_vec, normalize=True, normalization="component"),
            radial=self.distance_expansion(edge_vec.norm(dim=-1)),
            num_nodes=len(atomic_numbers),
        )
        x = self.edge_degree_embedding(edges)  # [N, D_node]
        scalars = self.atom_embedding.embedding_dim
        x = torch.cat(
            [x[:, :scalars] + self.atom_embedding(atomic_numbers).to(x.dtype), x[:, scalars:]], dim=1
        )
        return x, EquiformerV1State(edges, pos, strain)

    def interact(self, x: torch.Tensor, state: EquiformerV1State, data) -> torch.Tensor:
        """Every transformer block but the last, ``[N, D_node] -> [N, D_node]``."""
        for block in self.interaction_blocks:
            x = block(x, state.edges, data.batch, len(data.natoms))
        return x

    def readout(self, x: torch.Tensor, state: EquiformerV1State, data) -> dict[str, torch.Tensor]:
        """The last block (``[N, D_node] -> [N, D_feature]``), the final norm, and the embeddings
        the heads read."""
        x = self.blocks[-1](x, state.edges, data.batch, len(data.natoms))  # [N, D_feature]
        x = self.norm(x)
        return {"node_embedding": x, "graph": state.edges, "pos": state.pos, "strain": state.strain}

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        x, state = self.embed(data)
        return self.readout(self.interact(x, state, data), state, data)

    def _apply(self, fn, *args, **kwargs):
        """Casts as usual, but the Wigner 3j constants are converted from exact float64 values."""
        super()._apply(fn, *args, **kwargs)
        restore_exact_wigner_3j(self)
        return self

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay (the reference's rule): biases and norm parameters,
        of ``nn.Linear``, ``nn.LayerNorm`` (radial MLPs) and the equivariant layer norms."""
        return weight_decay_exempt(self, (nn.Linear, o3.Linear), (nn.LayerNorm, IrrepsLayerNorm))
