"""EquiformerV3 (Liao et al., arXiv:2604.09130), as a drop-in for the official ``equiformer_v3``:
the backbone with its energy head and either its direct force and stress heads
(``direct_prediction: true``) or the shared gradient head (``-dE/dpos`` forces and
``(1/V) dE/d(strain)`` stress). Parameter names are the official checkpoints' (``energy_block``,
``force_block``, ``stress_block``); see ``checkpoint.py`` for what loads."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad

from fairchem_equiformers.heads import energy_gradients

from .backbone import EquiformerV3Backbone
from .checkpoint import register_official_layout
from .heads import EquiformerV3EnergyHead, EquiformerV3ForceHead, EquiformerV3StressHead


@registry.register_model("fairchem_equiformers.EquiformerV3")
class EquiformerV3(EquiformerV3Backbone):
    """EquiformerV3 energy, force and stress model.

    Takes the model-section keys of the official configs (see ``EquiformerV3Backbone``).
    ``forward(data)`` returns ``{"energy": [B], "forces": [N, 3]}`` (forces with
    ``regress_forces``), plus ``"stress": [B, 9]`` (row-major 3x3) with ``regress_stress``.
    Direct mode predicts forces and stress with heads; gradient mode
    (``direct_prediction: false``) differentiates the energy, with ``create_graph`` in training
    so that force and stress losses train the energy. Official state dicts load strictly;
    a direct checkpoint loads into a gradient model with its direct heads dropped and a warning
    (the official fine-tuning recipe).
    """

    def __init__(self, **model_keys) -> None:
        super().__init__(**model_keys)
        register_official_layout(self)

    def add_heads(self) -> None:
        self.energy_block = EquiformerV3EnergyHead(self)
        direct = self.direct_prediction and self.regress_forces
        self.force_block = EquiformerV3ForceHead(self) if direct else None
        self.stress_block = (
            EquiformerV3StressHead(self) if self.direct_prediction and self.regress_stress else None
        )

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        # the neighbour search first, alone in its statement: torch.compile's one graph break is
        # there, with nothing on the stack (a bound method there would recompile every call)
        inputs = self.graph_inputs(data)
        return self.predict(data, self.embeddings(data, inputs))

    def predict(self, data, emb: dict) -> dict[str, torch.Tensor]:
        """The heads on the backbone's embeddings ``emb`` (``DEQ`` calls this on its fixed point)."""
        outputs = self.energy_block(data, emb)
        if self.conservative:
            outputs.update(energy_gradients(outputs["energy"], emb, data, create_graph=self.training))
            return outputs
        if self.force_block is not None:
            outputs.update(self.force_block(data, emb))
        if self.stress_block is not None:
            outputs.update(self.stress_block(data, emb))
        return outputs
