"""EquiformerV3's own heads: energy (an MLP on the scalar channels, summed over atoms and divided
by ``avg_num_nodes``), direct forces (a graph attention with one output channel, read at degree
1) and direct stress (a gated feed-forward network read at degrees 0 and 2, averaged over the
structure's atoms). Each takes the backbone at construction (fairchem's ``HeadInterface``) and
keeps the attribute layout of the official ``energy_block`` / ``force_block`` / ``stress_block``."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface
from torch import nn

from fairchem_equiformers.primitives import accumulation_dtype, precision_scope

from .attention import EquivariantGraphAttention
from .backbone import EquiformerV3Backbone, init_weights_v3
from .feed_forward import FeedForwardV3


def _initialised(head: nn.Module, backbone: EquiformerV3Backbone) -> None:
    """A head added to a finished backbone (hydra) gets the official initialisation itself."""
    if backbone.__dict__.get("_heads_done", True):
        init_weights_v3(head)


@registry.register_model("fairchem_equiformers.EquiformerV3EnergyHead")
class EquiformerV3EnergyHead(nn.Module, HeadInterface):
    """``{"energy": [B]}``: ``sum_atoms MLP(x[:, 0]) / avg_num_nodes``."""

    def __init__(self, backbone: EquiformerV3Backbone) -> None:
        super().__init__()
        channels, hidden = backbone.num_channels, backbone.ffn_hidden_channels
        self.linear_1 = nn.Linear(channels, hidden)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden, 1)
        self.avg_num_nodes = backbone.avg_num_nodes
        _initialised(self, backbone)

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        node_energy = self.linear_2(self.act(self.linear_1(emb["node_embedding"][:, 0])))[:, 0]  # [N]
        node_energy = node_energy.to(accumulation_dtype(node_energy))  # summed in float32 under autocast
        energy = node_energy.new_zeros(len(data.natoms)).index_add_(0, data.batch, node_energy)
        return {"energy": energy / self.avg_num_nodes}


@registry.register_model("fairchem_equiformers.EquiformerV3ForceHead")
class EquiformerV3ForceHead(EquivariantGraphAttention, HeadInterface):
    """``{"forces": [N, 3]}``: the degree-1 output of one graph attention without dropout
    (gate activation with ``use_gate_force_head``, else ``sep_s2``)."""

    def __init__(self, backbone: EquiformerV3Backbone) -> None:
        super().__init__(
            **backbone._attention_args, out_channels=1,
            activation="gate" if backbone.use_gate_force_head else "sep_s2",
        )  # fmt: skip
        self.precision = backbone.precision
        _initialised(self, backbone)

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        with precision_scope(self.precision, emb["node_embedding"].device):
            forces = super().forward(emb["node_embedding"], emb["graph"])[:, 1:4, 0]  # [N, 3]
        if self.precision != "fp32":
            forces = forces.float()
        return {"forces": forces.contiguous()}


def stress_from_degrees() -> torch.Tensor:
    """``[9, 9]``: the coefficients of degrees 0 (1 row), 1 (3) and 2 (5) of a 3x3 tensor ->
    the tensor, row-major. The degree-1 rows (the antisymmetric part) are zero: a stress is
    symmetric. Rows as the official change-of-basis matrix."""
    s2, s3, s6 = 2**-0.5, 3**-0.5, 6**-0.5
    rows = [
        [s3, 0, 0, 0, s3, 0, 0, 0, s3],  # l = 0: the trace
        *[[0.0] * 9] * 3,  # l = 1
        [0, 0, s2, 0, 0, 0, s2, 0, 0],  # l = 2
        [0, s2, 0, s2, 0, 0, 0, 0, 0],
        [-s6, 0, 0, 0, 2 * s6, 0, 0, 0, -s6],
        [0, 0, 0, 0, 0, s2, 0, s2, 0],
        [-s2, 0, 0, 0, 0, 0, 0, 0, s2],
    ]
    return torch.tensor(rows, dtype=torch.float64)


@registry.register_model("fairchem_equiformers.EquiformerV3StressHead")
class EquiformerV3StressHead(FeedForwardV3, HeadInterface):
    """``{"stress": [B, 9]}`` (row-major 3x3, the unit of the training labels): a gated
    feed-forward network with one output channel; its degree-0 and degree-2 coefficients,
    averaged over each structure's atoms, are the stress's trace and traceless parts."""

    def __init__(self, backbone: EquiformerV3Backbone) -> None:
        super().__init__(
            backbone.layout.lmax, backbone.ffn_grid, backbone.num_channels, backbone.ffn_hidden_channels, 1,
            "gate", False,
        )  # fmt: skip
        self.register_buffer("from_degrees", stress_from_degrees(), persistent=False)
        self.precision = backbone.precision
        _initialised(self, backbone)

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        with precision_scope(self.precision, emb["node_embedding"].device):
            coefficients = super().forward(emb["node_embedding"])[:, :9, 0]  # [N, 9] degrees 0..2
        coefficients = coefficients.to(accumulation_dtype(coefficients))  # summed in float32
        num_graphs = len(data.natoms)
        summed = coefficients.new_zeros(num_graphs, 9).index_add_(0, data.batch, coefficients)
        counts = data.natoms.clamp(min=1).to(summed.dtype)  # [B]
        return {"stress": (summed / counts[:, None]) @ self.from_degrees.to(summed.dtype)}
