"""The one gradient head: forces ``-dE/dpos`` and stress ``(1/V) dE/d(strain)`` for every family.

A backbone asked for gradients (``gradient_inputs``) returns, beside its embeddings, the
positions its graph was built from (``emb["pos"]``, requiring grad) and a zero strain
(``emb["strain"]``, ``[B, 3, 3]`` or ``None``) that its edge vectors were deformed by
(``strained``). ``energy_gradients`` differentiates a returned energy with respect to both.

One detach policy: a caller's positions that already require grad are used as they are (so
second derivatives through the forces reach the caller); otherwise a detached copy is made to
require grad. The graph of the derivatives is kept (``create_graph``) in training, so a force
loss trains the energy model, and whenever the caller's positions require grad.
"""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface
from torch import nn


def check_gradient_outputs(
    regress_forces: bool, direct_forces: bool, regress_stress: bool, use_pbc: bool
) -> None:
    """Raise ``ValueError`` for a stress that cannot be computed: it is the strain derivative of the
    energy, taken with the forces (gradient forces), and needs a cell (``use_pbc``)."""
    if regress_stress and (direct_forces or not regress_forces or not use_pbc):
        raise ValueError(
            "regress_stress=True needs direct_forces=False and regress_forces=True (the stress is "
            "the strain derivative of the energy, computed with the forces) and use_pbc=True "
            f"(it needs a cell); got direct_forces={direct_forces}, regress_forces={regress_forces}, "
            f"use_pbc={use_pbc}"
        )


def gradient_inputs(data, forces: bool, stress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions ``[N, 3]`` to build the graph from (requiring grad when ``forces`` or ``stress``)
    and a zero strain ``[B, 3, 3]`` requiring grad (``None`` unless ``stress``)."""
    pos = data.pos
    if (forces or stress) and not pos.requires_grad:
        pos = pos.detach().requires_grad_()
    strain = None
    if stress:
        strain = pos.new_zeros(len(data.natoms), 3, 3, requires_grad=True)
    return pos, strain


def strained(edge_vec: torch.Tensor, strain: torch.Tensor | None, edge_graph: torch.Tensor) -> torch.Tensor:
    """Edge vectors ``[E, 3]`` of positions and cell deformed by ``1 + sym(strain)`` (the graph of
    each edge ``[E]``): ``r + r sym(strain)``. Unchanged when ``strain`` is ``None``."""
    if strain is None:
        return edge_vec
    symmetric = 0.5 * (strain + strain.transpose(1, 2))  # [B, 3, 3]
    return edge_vec + torch.einsum("ei,eij->ej", edge_vec, symmetric[edge_graph])


def energy_gradients(energy: torch.Tensor, emb: dict, data, create_graph: bool) -> dict[str, torch.Tensor]:
    """``{"forces": -dE/dpos [N, 3]}`` and, when the backbone made a strain, ``{"stress": [B, 9]}``:
    ``(1/V) dE/d(strain)`` in eV/A^3, ASE's sign, row-major 3x3 per graph (as fairchem's eSEN)."""
    pos, strain = emb["pos"], emb.get("strain")
    inputs = [pos] if strain is None else [pos, strain]
    create_graph = create_graph or data.pos.requires_grad
    gradients = torch.autograd.grad(
        energy.sum(), inputs, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    outputs = {"forces": -gradients[0]}
    if strain is not None:
        volume = torch.linalg.det(data.cell.to(energy.dtype)).abs()  # [B]
        outputs["stress"] = (gradients[1] / volume[:, None, None]).reshape(len(volume), 9)
    return outputs


@registry.register_model("fairchem_equiformers.GradientHead")
class GradientHead(nn.Module, HeadInterface):
    """Energy, ``-dE/dpos`` forces and (with a backbone built with ``regress_stress``) the stress,
    for fairchem's ``hydra`` model: ``heads: {energy: {module: fairchem_equiformers.GradientHead}}``
    with ``pass_through_head_outputs: true``. ``energy_head`` names the energy head to
    differentiate (a registered head and its keys, ``{module: ..., ...}``); by default the
    backbone family's own (``backbone.energy_head_class``). The backbone needs
    ``direct_forces: false`` (EquiformerV3: ``direct_prediction: false``), so that it returns
    positions that require grad."""

    def __init__(self, backbone: nn.Module, energy_head: dict | None = None) -> None:
        super().__init__()
        if getattr(backbone, "direct_forces", True) or not backbone.regress_forces:
            raise ValueError(
                "GradientHead needs a backbone built with regress_forces: true and direct_forces: false "
                "(EquiformerV3: direct_prediction: false): it differentiates the energy with respect to "
                "the positions the backbone returns"
            )
        if energy_head is None:
            self.energy = backbone.energy_head_class(backbone)
        else:
            energy_head = dict(energy_head)
            self.energy = registry.get_model_class(energy_head.pop("module"))(backbone, **energy_head)

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        with torch.enable_grad():
            energy = self.energy(data, emb)["energy"]
            return {"energy": energy, **energy_gradients(energy, emb, data, self.training)}
