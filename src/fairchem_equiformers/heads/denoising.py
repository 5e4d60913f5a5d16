"""DeNS, the model side (denoising non-equilibrium structures; Liao, Smidt, Shuaibi, Das,
arXiv:2403.09549): shared by the EquiformerV2 and EquiformerV3 DeNS models.

In a DeNS batch (the trainer's ``training/denoising.py`` marks it) some atoms' positions carry
Gaussian noise and the model sees, as an extra input, the forces of the structure before the
noise, encoded on those atoms (``ForceEncoding``). A second vector head predicts the noise; the
model's ``forces`` output holds that prediction on the noisy atoms and the forces elsewhere
(``mix_denoised``), and the stress of a denoised structure is zero (it is not trained). A batch
without the mark is an ordinary one: no force input, the forces and stress as usual.

The batch attributes (the official trainers' names): ``denoising_pos_forward`` (bool, the
mark), ``forces`` ``[N, 3]`` (the forces to encode, eV/A, unnormalised), ``noise_mask`` ``[N]``
bool (the noisy atoms; all atoms without it) and ``dens_batch_mask`` ``[B]`` bool (the denoised
structures; all structures without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3

from fairchem_equiformers.primitives import SO3Linear


@dataclass
class DenoisingInputs:
    """What a batch tells a DeNS model; all zeros / ``False`` for an ordinary batch."""

    forces: torch.Tensor  # [N, 3] forces to encode
    noise_mask: torch.Tensor  # [N] bool: noisy atoms, whose force output is the predicted noise
    structure_mask: torch.Tensor  # [B] bool: denoised structures, whose stress output is zero
    active: bool  # whether the batch is a DeNS batch


def denoising_inputs(data) -> DenoisingInputs:
    num_atoms, num_graphs, device = len(data.pos), len(data.natoms), data.pos.device
    if not getattr(data, "denoising_pos_forward", False):
        return DenoisingInputs(
            forces=data.pos.new_zeros(num_atoms, 3).detach(),
            noise_mask=torch.zeros(num_atoms, dtype=torch.bool, device=device),
            structure_mask=torch.zeros(num_graphs, dtype=torch.bool, device=device),
            active=False,
        )
    if getattr(data, "forces", None) is None:
        raise ValueError("a DeNS batch (denoising_pos_forward) needs the forces to encode (data.forces)")
    noise_mask = getattr(data, "noise_mask", None)
    structure_mask = getattr(data, "dens_batch_mask", None)
    return DenoisingInputs(
        forces=data.forces.to(data.pos.dtype),
        noise_mask=(
            torch.ones(num_atoms, dtype=torch.bool, device=device)
            if noise_mask is None
            else noise_mask.view(-1).bool()
        ),
        structure_mask=(
            torch.ones(num_graphs, dtype=torch.bool, device=device)
            if structure_mask is None
            else structure_mask.view(-1).bool()
        ),
        active=True,
    )


class ForceEncoding(SO3Linear):
    """The forces of the noisy atoms as node features ``[N, (lmax+1)**2, C]``: the real spherical
    harmonics of each force's direction (e3nn, component normalisation) times ``|F| / sqrt(3)``,
    through a per-degree linear layer from one channel.

    ``bias_on_every_atom``: EquiformerV2's DeNS masks the input, so the layer's degree-0 bias
    reaches every atom in every batch; EquiformerV3's masks the output, so atoms without noise
    (and every atom of an ordinary batch) get exactly zero. Parameters: ``weight [lmax+1, C, 1]``,
    ``bias [C]``."""

    def __init__(self, lmax: int, channels: int, bias_on_every_atom: bool) -> None:
        super().__init__(1, channels, lmax)
        self.irreps = o3.Irreps.spherical_harmonics(lmax, p=1)
        self.bias_on_every_atom = bias_on_every_atom

    def forward(self, inputs: DenoisingInputs) -> torch.Tensor:
        forces = inputs.forces  # [N, 3]
        harmonics = o3.spherical_harmonics(self.irreps, forces, normalize=True, normalization="component")
        encoded = harmonics * (forces.norm(dim=-1, keepdim=True) / math.sqrt(3.0))  # [N, K]
        mask = inputs.noise_mask[:, None, None].to(encoded.dtype)  # [N, 1, 1]
        if self.bias_on_every_atom:
            return super().forward(encoded[:, :, None] * mask)
        return super().forward(encoded[:, :, None]) * mask  # [N, K, C]


def mix_denoised(outputs: dict, denoised: torch.Tensor, inputs: DenoisingInputs) -> dict:
    """The model's outputs with the predicted noise ``[N, 3]`` as the noisy atoms' ``forces`` and
    a zero ``stress`` for the denoised structures."""
    outputs = dict(outputs)
    if "forces" in outputs:
        keep = ~inputs.noise_mask[:, None]
        outputs["forces"] = outputs["forces"] * keep + denoised * inputs.noise_mask[:, None]
    if "stress" in outputs:
        outputs["stress"] = outputs["stress"] * ~inputs.structure_mask[:, None]
    return outputs
