"""E2Former (Liu, Wang, Wang, Dral; arXiv:2501.19216): the backbone (``backbone.py``) with its
energy head and either the shared gradient head's ``-dE/dpos`` forces (default; and the stress
with ``regress_stress``) or its direct force head (``direct_forces``). Parameter names are those
of the single-module model (``energy_head``, ``force_head``), so its checkpoints load unchanged."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad

from fairchem_equiformers.heads import energy_gradients

from .backbone import E2FormerBackbone, parse_node_irreps
from .heads import E2FormerEnergyHead, E2FormerForceHead

__all__ = ["E2Former", "parse_node_irreps"]


@registry.register_model("fairchem_equiformers.E2Former")
class E2Former(E2FormerBackbone):
    """E2Former energy and force model. Takes every key of ``E2FormerBackbone``.
    ``forward(data)`` returns ``{"energy": [B]}`` and, with ``regress_forces``, ``"forces": [N, 3]``:
    ``-dE/dpos`` (graph kept while training, or when the caller's positions require grad) or, with
    ``direct_forces``, the l = 1 output of a gated head; plus ``"stress": [B, 9]`` with
    ``regress_stress`` (``(1/V) dE/d(strain)`` in eV/A^3, ASE's sign, row-major 3x3 per graph)."""

    def add_heads(self) -> None:
        self.energy_head = E2FormerEnergyHead(self)
        direct = self.regress_forces and self.direct_forces
        self.force_head = E2FormerForceHead(self) if direct else None

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        return self.predict(data, super().forward(data))

    def predict(self, data, emb: dict) -> dict[str, torch.Tensor]:
        """The heads on the backbone's embeddings ``emb`` (``DEQ`` calls this on its fixed point)."""
        outputs = self.energy_head(data, emb)
        if self.conservative:
            outputs.update(energy_gradients(outputs["energy"], emb, data, create_graph=self.training))
        elif self.regress_forces:
            outputs.update(self.force_head(data, emb))
        return outputs
