"""EquiformerV2 (Liao, Wood, Das, Smidt; arXiv:2306.12059), as a drop-in for the released
OC20/OC22 models: the backbone with its energy head and either its force head (released) or the
shared gradient head (``direct_forces=False``: ``-dE/dpos`` forces, and the stress with
``regress_stress``). Parameter names are the released checkpoints' (``energy_block``,
``force_block``); see ``checkpoint.py`` for the layouts that load."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad

from fairchem_equiformers.heads import energy_gradients

from .backbone import EquiformerV2Backbone
from .checkpoint import register_checkpoint_compatibility
from .heads import EquiformerV2EnergyHead, EquiformerV2ForceHead


@registry.register_model("fairchem_equiformers.EquiformerV2")
class EquiformerV2(EquiformerV2Backbone):
    """EquiformerV2 energy and force model.

    Takes the model-section keys of the released configs (fairchem's ``equiformer_v2``; see
    ``EquiformerV2Backbone`` for every key). ``forward(data)`` returns ``{"energy": [B],
    "forces": [N, 3]}`` (forces only with ``regress_forces``), plus ``"stress": [B, 9]`` with
    ``regress_stress``.

    ``direct_forces``: ``True`` (released) predicts the forces with a force head; ``False``
    builds no force head and returns ``-dE/dpos`` (with ``create_graph`` in training mode, so
    force losses train the energy model). Released checkpoints load into a
    ``direct_forces=False`` model: their force head is skipped with a warning (see
    ``checkpoint.py``). ``regress_stress`` (needs ``direct_forces=False``, ``regress_forces`` and
    ``use_pbc``) adds the stress ``(1/V) dE/d(strain)`` in eV/A^3, ASE's sign, row-major 3x3 per
    graph as fairchem's eSEN returns it.
    """

    def __init__(self, **model_keys) -> None:
        super().__init__(**model_keys)
        register_checkpoint_compatibility(self)

    def add_heads(self) -> None:
        self.energy_block = EquiformerV2EnergyHead(self)
        # the forces are the degree-1 output: the head computes nothing else
        direct = self.regress_forces and self.direct_forces
        self.force_block = EquiformerV2ForceHead(self) if direct else None

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        return self.predict(data, super().forward(data))

    def predict(self, data, emb: dict) -> dict[str, torch.Tensor]:
        """The heads on the backbone's embeddings ``emb`` (``DEQ`` calls this on its fixed point)."""
        outputs = self.energy_block(data, emb)
        if self.conservative:
            outputs.update(energy_gradients(outputs["energy"], emb, data, create_graph=self.training))
        elif self.regress_forces:
            outputs.update(self.force_block(data, emb))
        return outputs
