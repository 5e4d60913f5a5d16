"""EquiformerV2's own heads: the energy head (a feed-forward network to one scalar per atom,
summed and divided by ``avg_num_nodes``) and the direct force head (a graph attention whose only
output is degree 1). Both take the backbone at construction (fairchem's ``HeadInterface``) and
keep the attribute layout of the released ``energy_block`` / ``force_block``."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface

from fairchem_equiformers.primitives import accumulation_dtype, precision_scope

from .attention import SO2GraphAttention
from .backbone import EquiformerV2Backbone, init_weights
from .feed_forward import FeedForward


@registry.register_model("fairchem_equiformers.EquiformerV2EnergyHead")
class EquiformerV2EnergyHead(FeedForward, HeadInterface):
    """``{"energy": [B]}``: ``sum_atoms FFN(x)[:, l=0] / avg_num_nodes`` (plus the element
    references the backbone returns with ``use_energy_lin_ref``)."""

    def __init__(self, backbone: EquiformerV2Backbone) -> None:
        super().__init__(*backbone._feed_forward_args, 1, *backbone._feed_forward_options)
        self.avg_num_nodes = backbone.avg_num_nodes
        if not backbone.heads_pending:
            init_weights(self, backbone.weight_init)

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        node_energy = super().forward(emb["node_embedding"])[:, 0, 0]  # [N]
        node_energy = node_energy.to(accumulation_dtype(node_energy))  # summed in float32 under autocast
        energy = node_energy.new_zeros(len(data.natoms)).index_add_(0, data.batch, node_energy)
        energy = energy / self.avg_num_nodes
        if "node_energy_reference" in emb:
            energy = energy.index_add(0, data.batch, emb["node_energy_reference"].to(energy.dtype))
        return {"energy": energy}


@registry.register_model("fairchem_equiformers.EquiformerV2ForceHead")
class EquiformerV2ForceHead(SO2GraphAttention, HeadInterface):
    """``{"forces": [N, 3]}``: the degree-1 output of one graph attention (no dropout)."""

    def __init__(self, backbone: EquiformerV2Backbone) -> None:
        super().__init__(
            *backbone._attention_args, 1, *backbone._attention_options, 0.0, 1
        )  # output_channels 1, alpha_drop 0, output_degree 1
        self.precision = backbone.precision
        if not backbone.heads_pending:
            init_weights(self, backbone.weight_init)

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        with precision_scope(self.precision, emb["node_embedding"].device):
            forces = super().forward(emb["node_embedding"], emb["graph"])[:, :, 0]  # [N, 3]
        if self.precision != "fp32":
            forces = forces.float()
        return {"forces": forces.contiguous()}
