"""E2Former's own heads: the energy head (an MLP of each atom's scalars, summed per graph) and the
direct force head (the l = 1 output of a gated feed-forward network). Both take the backbone at
construction (fairchem's ``HeadInterface``) and keep the parameter names of the composite model
(``energy_head.*``, ``force_head.*``)."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface
from torch import nn

from .backbone import E2FormerBackbone
from .block import GatedFeedForward


@registry.register_model("fairchem_equiformers.E2FormerEnergyHead")
class E2FormerEnergyHead(nn.Sequential, HeadInterface):
    """``{"energy": [B]}``: ``sum_atoms MLP(x[:, l=0])`` (Linear, SiLU, Linear)."""

    def __init__(self, backbone: E2FormerBackbone) -> None:
        channels = backbone.channels
        super().__init__(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        node_energy = super().forward(emb["node_embedding"][:, 0])[:, 0]  # [N]
        energy = node_energy.new_zeros(len(data.natoms)).index_add_(0, data.batch, node_energy)
        return {"energy": energy}


@registry.register_model("fairchem_equiformers.E2FormerForceHead")
class E2FormerForceHead(GatedFeedForward, HeadInterface):
    """``{"forces": [N, 3]}``: the l = 1 output (x, y, z) of a gated feed-forward network."""

    def __init__(self, backbone: E2FormerBackbone) -> None:
        super().__init__(backbone.lmax, backbone.channels, backbone.channels, 1)

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        forces = super().forward(emb["node_embedding"])  # [N, K, 1]
        return {"forces": forces[:, 1:4, 0].contiguous()}
