"""Output heads of Equiformer (V1) on the final node features ``[N, irreps_feature.dim]``.

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

import torch
from ase import units
from e3nn import o3
from torch import nn

from fairchem_equiformers.primitives.irreps import gate_activation

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
