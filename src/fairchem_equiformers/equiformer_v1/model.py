"""Equiformer (V1): equivariant graph attention transformer on e3nn irreps features
(Liao & Smidt, ICLR 2023, arXiv:2206.11990; reference code atomicarchitects/equiformer).

Architecture as in the reference: atom-type embedding plus edge-degree embedding, pre-norm
transformer blocks (equivariant layer norm, equivariant graph attention, gate FFN, graph
drop-path), the last block mapping to ``irreps_feature``, a final norm and an MLP energy head
whose per-atom outputs are summed and divided by ``sqrt(avg_num_nodes)``. Spherical harmonics are
declared even (``1x0e+1x1e+...``) as in the reference's SE(3) models: the model is equivariant to
rotations, not to reflections.

Deviations from the reference, none of which changes what the model can represent: e3nn 0.6's
``o3.Linear``/``o3.TensorProduct`` normalise by fan-in in the forward pass where the reference
rescales the initial weights; the atom embedding is an ``nn.Embedding`` (the reference's one-hot
linear layer with a bias that only adds a constant); the edge-degree embedding starts from
scalars only (see ``EdgeDegreeEmbedding``); the ``gaussian`` radial basis is the shared fixed
``GaussianBasis`` (the reference trains the centres and widths of its Gaussians); the
``dot_product`` variant is this package's reading of the paper's ablation (query from the
target, key and value from the message). Gradient forces use the edge vectors built from the
positions (``direct_forces=False``); ``direct_forces=True`` adds an attention head with one
vector output per atom. ``regress_displacement=True`` adds the same kind of head for the OC20
IS2RE auxiliary task (IS2RS, Noisy Nodes): the displacement from the input to the relaxed
positions (``fairchem_equiformers.NoisyNodesLmdbDataset`` provides the target).

QM9-style properties (``heads.py``): ``target`` names the predicted property, the key of the
output dict that the trainer matches to the dataset field of that name; ``head="scalar"`` predicts
it as the (energy-like) sum of atomic scalars, ``head="dipole"`` predicts a dipole moment.
"""

from __future__ import annotations

import copy
import math

import torch
from e3nn import o3
from fairchem.core.common.registry import registry
from fairchem.core.models.base import GraphModelMixin
from torch import nn

from fairchem_equiformers.primitives import (
    BesselBasis,
    ExpNormalBasis,
    GaussianBasis,
    check_common_model_keys,
    check_structures,
    radius_graph_nonperiodic,
)
from fairchem_equiformers.primitives.irreps import (
    IrrepsLayerNorm,
    e3nn_eager,
    is_even_scalar,
    restore_exact_wigner_3j,
)

from .attention import ATTENTION_TYPES, EdgeFeatures, EquivariantGraphAttention
from .blocks import EdgeDegreeEmbedding, TransformerBlock
from .heads import HEADS, DipoleHead, scalar_head

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


@registry.register_model("fairchem_equiformers.EquiformerV1")
class EquiformerV1(nn.Module, GraphModelMixin):
    """Equiformer energy model with gradient (``direct_forces=False``) or direct forces.

    The defaults are the paper's MD17 L2 model (``graph_attention_transformer_nonlinear_exp_l2_md17``).
    ``forward(data)`` returns ``{"energy": [B], "forces": [N, 3]}`` (forces with ``regress_forces``)
    with the default head, plus ``"displacement": [N, 3]`` with ``regress_displacement``;
    ``{target: [B]}`` with ``head="scalar"`` and another ``target``; and
    ``{target: |mu| [B], target + "_vector": mu [B, 3]}`` (Debye) with ``head="dipole"``.

    Args:
        use_pbc: periodic graphs (fairchem's neighbour search) or molecules (this package's own
            radius graph; needs neither torch-cluster nor pyg-lib).
        use_pbc_single / enforce_max_neighbors_strictly: passed to fairchem's periodic neighbour
            search (one structure at a time; keep exactly ``max_neighbors`` even when the next
            neighbours are at the same distance), as in fairchem's models.
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
        regress_displacement: also predict a per-atom vector, the displacement to the relaxed
            structure (IS2RE with the IS2RS auxiliary task), with an attention head on the final
            features like the direct-force head (the reference's ``auxiliary_head``).
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
    """

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

        # attributes GraphModelMixin.generate_graph reads
        self.use_pbc, self.use_pbc_single, self.otf_graph = use_pbc, use_pbc_single, otf_graph
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.max_neighbors, self.max_radius, self.cutoff = max_neighbors, max_radius, max_radius
        self.regress_forces, self.direct_forces = regress_forces, direct_forces
        self.max_num_elements = max_num_elements
        self.avg_num_nodes = avg_num_nodes
        self.head, self.target = head, target
        self.irreps_sh = o3.Irreps([(1, (l, 1)) for l in range(irreps_node.lmax + 1)])  # SE(3): all even

        radial_channels = [num_radial_basis, *radial_hidden_channels]
        self.atom_embedding = nn.Embedding(max_num_elements, irreps_node.count("0e"))
        self.distance_expansion = make_radial_basis(radial_basis, max_radius, num_radial_basis)
        self.edge_degree_embedding = EdgeDegreeEmbedding(
            irreps_node, self.irreps_sh, radial_channels, avg_degree
        )

        def attention(irreps_in: o3.Irreps, irreps_out: o3.Irreps) -> EquivariantGraphAttention:
            return EquivariantGraphAttention(
                irreps_in, self.irreps_sh, irreps_out, irreps_head, num_heads, radial_channels,
                attention_type, alpha_drop,
            )  # fmt: skip

        self.blocks = nn.ModuleList(
            TransformerBlock(
                attention(irreps_node, irreps_node),
                irreps_node,
                irreps_mid,
                irreps_feature if i == num_layers - 1 else irreps_node,
                drop_path_rate,
            )
            for i in range(num_layers)
        )
        self.norm = IrrepsLayerNorm(irreps_feature)
        if head == "dipole":
            self.dipole_head = DipoleHead(irreps_feature, attention(irreps_feature, o3.Irreps("1x1e")))
        else:
            self.energy_head = scalar_head(irreps_feature)
        self.force_head = attention(irreps_feature, o3.Irreps("1x1e")) if direct_forces else None
        self.displacement_head = (
            attention(irreps_feature, o3.Irreps("1x1e")) if regress_displacement else None
        )

    def _edges(self, data, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge index ``[2, E]`` (source, target) and vectors source - target ``[E, 3]``, computed
        from ``pos`` (so that they carry its gradient).

        Molecules with ``otf_graph`` use this package's radius graph; otherwise the edges are
        fairchem's ``generate_graph``'s: its periodic neighbour search (``use_pbc_single``,
        ``enforce_max_neighbors_strictly``), run on a float32 copy (it only runs in float32), or
        with ``otf_graph=False`` the batch's own ``edge_index``/``cell_offsets``/``neighbors``.
        The vectors use the integer cell offsets in the positions' precision."""
        if not self.use_pbc and self.otf_graph:
            edge_index = radius_graph_nonperiodic(pos, data.batch, self.max_radius, self.max_neighbors)
            return edge_index, pos[edge_index[0]] - pos[edge_index[1]]
        search_input = copy.copy(data)
        search_input.pos = pos.detach().float()
        if self.use_pbc:
            search_input.cell = data.cell.detach().float()
        graph = self.generate_graph(
            search_input,
            enforce_max_neighbors_strictly=self.enforce_max_neighbors_strictly,
            use_pbc_single=self.use_pbc_single,
        )
        source, target = graph.edge_index
        if not self.use_pbc:
            return graph.edge_index, pos[source] - pos[target]
        cells = data.cell[data.batch[source]].to(pos.dtype)  # [E, 3, 3]
        offsets = torch.einsum("ei,eij->ej", graph.cell_offsets.to(pos.dtype), cells)
        return graph.edge_index, pos[source] - pos[target] + offsets

    def forward(self, data) -> dict[str, torch.Tensor]:
        atomic_numbers = data.atomic_numbers.long()
        natoms = data.natoms
        check_structures(
            atomic_numbers, data.pos, natoms, self.max_num_elements,
            cell=data.cell if self.use_pbc else None, sid=getattr(data, "sid", None),
        )  # fmt: skip
        gradient_forces = self.regress_forces and not self.direct_forces
        with torch.set_grad_enabled(gradient_forces or torch.is_grad_enabled()):
            pos = data.pos
            if gradient_forces and not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            node_features, edges = self._features(data, atomic_numbers, pos)
            num_graphs = len(natoms)
            if self.head == "dipole":
                dipole = self.dipole_head(node_features, edges, pos, data.batch, num_graphs)  # [B, 3]
                return {self.target: torch.linalg.vector_norm(dipole, dim=1), f"{self.target}_vector": dipole}
            node_energy = self.energy_head(node_features)[:, 0]  # [N]
            energy = node_energy.new_zeros(num_graphs).index_add_(0, data.batch, node_energy)
            energy = energy / math.sqrt(self.avg_num_nodes)  # [B]
            outputs = {self.target: energy}
            if gradient_forces:
                (gradient,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
                outputs["forces"] = -gradient  # [N, 3]
        if self.direct_forces:
            outputs["forces"] = self.force_head(node_features, edges)  # [N, 3] (1x1e: x, y, z)
        if self.displacement_head is not None:
            outputs["displacement"] = self.displacement_head(node_features, edges)  # [N, 3]
        return outputs

    def _features(
        self, data, atomic_numbers: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, EdgeFeatures]:
        """Final (normed) node features ``[N, irreps_feature.dim]`` and the edges."""
        num_nodes = len(atomic_numbers)
        edge_index, edge_vec = self._edges(data, pos)  # [2, E], [E, 3]
        edges = EdgeFeatures(
            source=edge_index[0],
            target=edge_index[1],
            sh=o3.spherical_harmonics(self.irreps_sh, edge_vec, normalize=True, normalization="component"),
            radial=self.distance_expansion(edge_vec.norm(dim=-1)),
            num_nodes=num_nodes,
        )
        x = self.edge_degree_embedding(edges)  # [N, D_node]
        scalars = self.atom_embedding.embedding_dim
        x = torch.cat(
            [x[:, :scalars] + self.atom_embedding(atomic_numbers).to(x.dtype), x[:, scalars:]], dim=1
        )
        x = self._interact(x, edges, data)  # [N, D_feature]
        return self.norm(x), edges

    def _interact(self, x: torch.Tensor, edges: EdgeFeatures, data) -> torch.Tensor:
        """The transformer blocks, ``[N, D_node] -> [N, D_feature]`` (``DEQEquiformerV1`` replaces
        all but the last by the fixed point of its blocks)."""
        batch, num_graphs = data.batch, len(data.natoms)
        for block in self.blocks:
            x = block(x, edges, batch, num_graphs)
        return x

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
        exempt = set()
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                is_bias = isinstance(module, (nn.Linear, o3.Linear)) and param_name != "weight"
                if is_bias or isinstance(module, (nn.LayerNorm, IrrepsLayerNorm)):
                    exempt.add(f"{module_name}.{param_name}" if module_name else param_name)
        return exempt
