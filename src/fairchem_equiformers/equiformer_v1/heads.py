"""Output heads of Equiformer (V1) on the final node features ``[N, irreps_feature.dim]``.

Each head is a fairchem ``HeadInterface`` built from the backbone (``EquiformerV1Backbone``) and
is the module it wraps (so the composite model's parameter names are unchanged):
``EquiformerV1EnergyHead`` (``energy_head.*``), ``EquiformerV1DipoleHead`` (``dipole_head.*``),
``EquiformerV1ForceHead`` (``force_head.*``) and ``EquiformerV1DisplacementHead``
(``displacement_head.*``).

* ``scalar`` (``scalar_head``): an MLP on the even scalars gives one number per atom; the model
  sums them over each structure and divides by ``sqrt(avg_num_nodes)``. This is the energy head,
  and the reference uses the same sum for every QM9 target, extensive (energies) or intensive
  (orbital energies, gap): the trainer's normalizer supplies the target's mean and spread.
* ``dipole`` (``DipoleHead``): the molecular dipole as a physical sum of atomic contributions,
  ``mu = sum_i q_i (r_i - c) + mu_i`` with per-atom charges ``q_i`` that sum to zero (neutral
  molecules) and per-atom dipoles ``mu_i`` from an attention layer with a vector output, as
  PaiNN's dipole head. The charges are even scalars and ``mu_i`` is a ``1e`` vector, so ``mu``
  rotates with the molecule, and because the charges sum to zero it does not depend on the centre
  ``c`` (the centroid) or on a translation. Its norm, QM9's dipole moment, is invariant.
"""

from __future__ import annotations

import math

import torch
from ase import units
from e3nn import o3
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface
from torch import nn

from fairchem_equiformers.primitives import e3nn_eager, gate_activation, restore_exact_wigner_3j

from .attention import EdgeFeatures, EquivariantGraphAttention

HEADS = ("scalar", "dipole")


def scalar_head(irreps_feature: o3.Irreps) -> nn.Sequential:
    """``[N, irreps_feature.dim] -> [N, 1]``: linear to the scalars, SiLU, linear to one scalar."""
    scalars = o3.Irreps(f"{irreps_feature.count('0e')}x0e")
    return nn.Sequential(
        o3.Linear(irreps_feature, scalars, biases=True),
        gate_activation(scalars),
        o3.Linear(scalars, "1x0e", biases=True),
    )


def segment_mean(values: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Mean of ``values [N, ...]`` over each graph -> ``[B, ...]``."""
    sums = values.new_zeros(num_graphs, *values.shape[1:]).index_add_(0, batch, values)
    counts = torch.bincount(batch, minlength=num_graphs).to(values.dtype)
    return sums / counts.view(-1, *[1] * (values.dim() - 1))


class DipoleHead(nn.Module):
    """Dipole vector of each molecule (Debye) from charges and atomic dipoles (module docstring).

    ``atomic_dipole`` maps the node features to one ``1x1e`` vector per atom (the model passes an
    ``EquivariantGraphAttention``: with scalar-only final features, the vectors come from the edge
    directions). Charges are in units of e and positions in A; the sum is converted to Debye."""

    def __init__(self, irreps_feature: o3.Irreps, atomic_dipole: EquivariantGraphAttention) -> None:
        super().__init__()
        self.charge = scalar_head(irreps_feature)
        self.atomic_dipole = atomic_dipole

    def forward(
        self, x: torch.Tensor, edges: EdgeFeatures, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int
    ) -> torch.Tensor:
        """``x: [N, D_feature]``, ``pos: [N, 3]`` -> dipole ``[B, 3]`` (Debye)."""
        charge = self.charge(x)[:, 0]  # [N] e
        charge = charge - segment_mean(charge, batch, num_graphs)[batch]  # neutral: sum_i q_i = 0
        centred = pos - segment_mean(pos, batch, num_graphs)[batch]  # [N, 3] A
        atomic = charge[:, None] * centred + self.atomic_dipole(x, edges)  # [N, 3] e*A (x, y, z)
        return atomic.new_zeros(num_graphs, 3).index_add_(0, batch, atomic) / units.Debye


class _ExactWigner3j:
    """Casts as usual, but the Wigner 3j constants are converted from exact float64 values (for a
    head cast on its own, e.g. in fairchem's ``hydra`` model)."""

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        restore_exact_wigner_3j(self)
        return self


@registry.register_model("fairchem_equiformers.EquiformerV1EnergyHead")
class EquiformerV1EnergyHead(nn.Sequential, HeadInterface):
    """``{target: [B]}`` (``target`` the backbone's, ``"energy"`` by default): the scalar head,
    ``sum_atoms scalar_head(x) / sqrt(avg_num_nodes)``."""

    @e3nn_eager()
    def __init__(self, backbone) -> None:
        super().__init__(*scalar_head(backbone.irreps_feature))
        self.avg_num_nodes, self.target = backbone.avg_num_nodes, backbone.target

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        node_energy = super().forward(emb["node_embedding"])[:, 0]  # [N]
        energy = node_energy.new_zeros(len(data.natoms)).index_add_(0, data.batch, node_energy)
        return {self.target: energy / math.sqrt(self.avg_num_nodes)}  # [B]


@registry.register_model("fairchem_equiformers.EquiformerV1DipoleHead")
class EquiformerV1DipoleHead(_ExactWigner3j, DipoleHead, HeadInterface):
    """``{target: |mu| [B], target + "_vector": mu [B, 3]}`` (Debye): ``DipoleHead`` with an
    attention layer of the backbone's sizes for the atomic dipoles (molecules only)."""

    @e3nn_eager()
    def __init__(self, backbone) -> None:
        atomic_dipole = backbone.attention(backbone.irreps_feature, o3.Irreps("1x1e"))
        super().__init__(backbone.irreps_feature, atomic_dipole)
        self.target = backbone.target

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        dipole = super().forward(
            emb["node_embedding"], emb["graph"], emb["pos"], data.batch, len(data.natoms)
        )  # [B, 3]
        return {self.target: torch.linalg.vector_norm(dipole, dim=1), f"{self.target}_vector": dipole}


@registry.register_model("fairchem_equiformers.EquiformerV1ForceHead")
class EquiformerV1ForceHead(_ExactWigner3j, EquivariantGraphAttention, HeadInterface):
    """``{"forces": [N, 3]}``: one graph attention of the backbone's sizes (its ``alpha_drop``
    included) from the final features to one ``1x1e`` vector per atom (x, y, z)."""

    output = "forces"

    @e3nn_eager()
    def __init__(self, backbone) -> None:
        super().__init__(*backbone.attention_arguments(backbone.irreps_feature, o3.Irreps("1x1e")))

    def forward(self, data, emb: dict) -> dict[str, torch.Tensor]:
        return {self.output: super().forward(emb["node_embedding"], emb["graph"])}  # [N, 3]


@registry.register_model("fairchem_equiformers.EquiformerV1DisplacementHead")
class EquiformerV1DisplacementHead(EquiformerV1ForceHead):
    """``{"displacement": [N, 3]}``: the displacement to the relaxed structure (IS2RE's IS2RS
    auxiliary task, Noisy Nodes), a graph attention like the direct-force head."""

    output = "displacement"
