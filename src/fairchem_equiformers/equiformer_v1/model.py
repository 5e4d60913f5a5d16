"""Equiformer (V1): equivariant graph attention transformer on e3nn irreps features
(Liao & Smidt, ICLR 2023, arXiv:2206.11990; reference code atomicarchitects/equiformer).

The backbone (``backbone.py``: embeddings, transformer blocks, final norm) with its heads
(``heads.py``): an MLP energy head whose per-atom outputs are summed and divided by
``sqrt(avg_num_nodes)``, as in the reference. Gradient forces ``-dE/dpos`` through the shared
gradient head (``direct_forces=False``, and the stress with ``regress_stress``);
``direct_forces=True`` adds an attention head with one vector output per atom.
``regress_displacement=True`` adds the same kind of head for the OC20 IS2RE auxiliary task
(IS2RS, Noisy Nodes): the displacement from the input to the relaxed positions
(``fairchem_equiformers.NoisyNodesLmdbDataset`` provides the target).

QM9-style properties (``heads.py``): ``target`` names the predicted property, the key of the
output dict that the trainer matches to the dataset field of that name; ``head="scalar"`` predicts
it as the (energy-like) sum of atomic scalars, ``head="dipole"`` predicts a dipole moment.
"""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad

from fairchem_equiformers.heads import energy_gradients

from .backbone import (
    QM9_AVG_DEGREE,
    QM9_AVG_NUM_NODES,
    RADIAL_BASES,
    EquiformerV1Backbone,
    make_radial_basis,
)
from .heads import (
    EquiformerV1DipoleHead,
    EquiformerV1DisplacementHead,
    EquiformerV1EnergyHead,
    EquiformerV1ForceHead,
)

__all__ = ["QM9_AVG_DEGREE", "QM9_AVG_NUM_NODES", "RADIAL_BASES", "EquiformerV1", "make_radial_basis"]


@registry.register_model("fairchem_equiformers.EquiformerV1")
class EquiformerV1(EquiformerV1Backbone):
    """Equiformer energy model with gradient (``direct_forces=False``) or direct forces.

    Takes every key of ``EquiformerV1Backbone`` (the defaults are the paper's MD17 L2 model,
    ``graph_attention_transformer_nonlinear_exp_l2_md17``). ``forward(data)`` returns
    ``{"energy": [B], "forces": [N, 3]}`` (forces with ``regress_forces``) with the default head,
    plus ``"stress": [B, 9]`` with ``regress_stress`` (eV/A^3, ASE's sign, row-major 3x3 per
    graph) and ``"displacement": [N, 3]`` with ``regress_displacement``; ``{target: [B]}`` with
    ``head="scalar"`` and another ``target``; and ``{target: |mu| [B], target + "_vector": mu
    [B, 3]}`` (Debye) with ``head="dipole"``.

    Gradient forces are ``-dE/dpos`` with ``create_graph`` in training mode (so force losses train
    the energy model) and whenever the caller's positions require grad.
    """

    def add_heads(self) -> None:
        if self.head == "dipole":
            self.dipole_head = EquiformerV1DipoleHead(self)
        else:
            self.energy_head = EquiformerV1EnergyHead(self)
        self.force_head = EquiformerV1ForceHead(self) if self.direct_forces else None
        self.displacement_head = EquiformerV1DisplacementHead(self) if self.regress_displacement else None

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        return self.predict(data, super().forward(data))

    def predict(self, data, emb: dict) -> dict[str, torch.Tensor]:
        """The heads on the backbone's embeddings ``emb`` (``DEQ`` calls this on its fixed point)."""
        if self.head == "dipole":
            return self.dipole_head(data, emb)
        outputs = self.energy_head(data, emb)
        if self.conservative:
            outputs.update(energy_gradients(outputs[self.target], emb, data, create_graph=self.training))
        elif self.direct_forces:
            outputs.update(self.force_head(data, emb))
        if self.displacement_head is not None:
            outputs.update(self.displacement_head(data, emb))
        return outputs
