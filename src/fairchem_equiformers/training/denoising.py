"""DeNS, the training side (denoising non-equilibrium structures; Liao, Smidt, Shuaibi, Das,
arXiv:2403.09549), as in the official EquiformerV3 recipes (``equiformer_v3_dens_trainer``) and
fairchem 1.10's EquiformerV2 ``dens_trainer``: the same optim keys, for every model with a DeNS
variant (``EquiformerV2DeNS``, ``EquiformerV3DeNS``; the model side is ``heads/denoising.py``).

With probability ``prob`` a training batch becomes a DeNS batch: Gaussian noise of ``std`` A per
component goes onto the positions of a random ``corrupt_ratio`` of its atoms (all atoms without
it), the model sees the corrupted positions and the clean structure's forces on the noisy atoms,
and its ``forces`` output on those atoms is trained to the noise divided by ``std``, with
weight ``denoising_pos_coefficient`` (the other atoms to their forces, with the force loss's
coefficient; per-atom L2 norms, averaged over the atoms). The energy is still the clean
structure's. Validation, test and prediction batches are never corrupted.

Optim keys::

    use_denoising_pos: true
    denoising_pos_coefficient: 10          # weight of the noise loss
    denoising_pos_params:
      prob: 0.5                            # share of training batches that are DeNS batches
      fixed_noise_std: true                # (the only mode: a fixed std)
      std: 0.025                           # A, per Cartesian component
      corrupt_ratio: 0.5                   # share of atoms that get noise (null: all)
      all_atoms: false                     # also move fixed atoms
      strict_max_ratio: 0.75               # skip structures with more noisy atoms than this share
      min_num_atoms: null                  # skip structures with fewer atoms
      max_force_norm: 2.5                  # skip structures whose largest force exceeds this (eV/A)
      max_stress_norm: null                # skip structures whose stress norm exceeds this
      max_mean_force_norm: null            # skip structures whose net force exceeds this (eV/A)
      early_epochs: null                   # DeNS only up to this epoch
      coefficient_linear_decay_min_factor: null  # decay the noise weight linearly to this factor

A skipped structure keeps its clean positions and ordinary targets; its stress is not trained in
a DeNS batch (the model returns zero for every structure of ``dens_batch_mask``, as the official
model). ``num_steps``, ``std_low`` and ``std_high`` belong to the noise schedule of fairchem's
trainer, which the official recipes leave off (``fixed_noise_std: true``); they are accepted and
unused, and ``fixed_noise_std: false`` is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch_scatter import scatter

OPTIM_KEYS = {"use_denoising_pos", "denoising_pos_params", "denoising_pos_coefficient"}
SCHEDULE_KEYS = {"num_steps", "std_low", "std_high"}  # the schedule's, unused with a fixed std


@dataclass(frozen=True)
class DenoisingParams:
    """The ``optim`` DeNS settings (see the module docstring)."""

    prob: float
    std: float
    coefficient: float
    corrupt_ratio: float | None = None
    all_atoms: bool = False
    min_num_atoms: int | None = None
    strict_max_ratio: float | None = None
    max_force_norm: float | None = None
    max_stress_norm: float | None = None
    max_mean_force_norm: float | None = None
    early_epochs: float | None = None
    coefficient_linear_decay_min_factor: float | None = None

    @classmethod
    def from_optim(cls, optim: dict) -> DenoisingParams | None:
        """The settings of an ``optim`` section, ``None`` without ``use_denoising_pos``; a
        ``ValueError`` names a key that is missing, unknown or out of range."""
        if not optim.get("use_denoising_pos", False):
            return None
        params = dict(optim.get("denoising_pos_params") or {})
        if not params.pop("fixed_noise_std", True):
            raise ValueError(
                "optim.denoising_pos_params.fixed_noise_std: false (fairchem's noise schedule with sigma "
                "encoding) is not supported; the official DeNS recipes use a fixed std"
            )
        for key in SCHEDULE_KEYS:
            params.pop(key, None)
        names = {f.name for f in fields(cls)} - {"coefficient"}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown optim.denoising_pos_params key(s) {unknown}; known: {sorted(names)}")
        if "denoising_pos_coefficient" not in optim:
            raise ValueError(
                "optim.use_denoising_pos needs optim.denoising_pos_coefficient (the noise loss weight)"
            )
        for key in ("prob", "std"):
            if params.get(key) is None:
                raise ValueError(f"optim.use_denoising_pos needs optim.denoising_pos_params.{key}")
        settings = cls(coefficient=float(optim["denoising_pos_coefficient"]), **params)
        if not 0 <= settings.prob <= 1:
            raise ValueError(f"optim.denoising_pos_params.prob={settings.prob}: give a probability in [0, 1]")
        if settings.std <= 0:
            raise ValueError(f"optim.denoising_pos_params.std={settings.std}: give a positive noise std (A)")
        if settings.strict_max_ratio is not None and settings.corrupt_ratio is None:
            raise ValueError("optim.denoising_pos_params.strict_max_ratio needs corrupt_ratio")
        factor = settings.coefficient_linear_decay_min_factor
        if factor is not None and not 0 <= factor <= 1:
            raise ValueError(
                f"optim.denoising_pos_params.coefficient_linear_decay_min_factor={factor}: give a factor "
                "in [0, 1]"
            )
        return settings

    def coefficient_at(self, progress: float) -> float:
        """The noise loss weight at ``progress`` (0 to 1) through the run."""
        if self.coefficient_linear_decay_min_factor is None:
            return self.coefficient
        return self.coefficient * (1 - (1 - self.coefficient_linear_decay_min_factor) * min(1.0, progress))


def _skip_structures(
    batch, keep: torch.Tensor, noise: torch.Tensor, structure_mask: torch.Tensor
) -> torch.Tensor:
    """Clear the noise of the structures not in ``keep`` ``[B]``; the new structure mask."""
    atoms = keep[batch.batch]  # [N]
    noise[~atoms] = 0
    batch.noise_mask = atoms if getattr(batch, "noise_mask", None) is None else batch.noise_mask & atoms
    return structure_mask & keep


def corrupt(batch, params: DenoisingParams):
    """Make ``batch`` a DeNS batch in place (the official order of random draws from torch's
    generator, so a seed gives the official noise): ``pos`` moved by ``noise_vec`` ``[N, 3]``,
    ``noise_mask`` ``[N]`` (with ``corrupt_ratio`` or a skip rule), ``dens_batch_mask`` ``[B]``,
    ``denoising_pos_forward``."""
    noise = torch.zeros_like(batch.pos).normal_(mean=0.0, std=params.std)  # [N, 3]
    structure_mask = torch.ones(len(batch.natoms), dtype=torch.bool, device=batch.pos.device)  # [B]
    if params.corrupt_ratio is not None:
        batch.noise_mask = (
            torch.rand(len(batch.pos), dtype=batch.pos.dtype, device=batch.pos.device) < params.corrupt_ratio
        )
        noise[~batch.noise_mask] = 0
    if getattr(batch, "skip_dens", None) is not None:
        structure_mask = _skip_structures(batch, ~batch.skip_dens.bool(), noise, structure_mask)
    if params.min_num_atoms is not None:
        structure_mask = _skip_structures(batch, batch.natoms >= params.min_num_atoms, noise, structure_mask)
    if params.strict_max_ratio is not None:
        noisy = scatter(batch.noise_mask.to(batch.pos.dtype), batch.batch, dim=0, dim_size=len(batch.natoms))
        keep = noisy <= batch.natoms * params.strict_max_ratio
        structure_mask = _skip_structures(batch, keep, noise, structure_mask)
    if params.max_force_norm is not None:
        largest = scatter(
            batch.forces.norm(dim=-1), batch.batch, dim=0, dim_size=len(batch.natoms), reduce="max"
        )
        structure_mask = _skip_structures(batch, largest <= params.max_force_norm, noise, structure_mask)
    if params.max_stress_norm is not None:
        norm = batch.stress.reshape(-1, 9).norm(dim=-1)
        structure_mask = _skip_structures(batch, norm <= params.max_stress_norm, noise, structure_mask)
    if params.max_mean_force_norm is not None:
        net = scatter(batch.forces, batch.batch, dim=0, dim_size=len(batch.natoms)).norm(dim=-1)
        structure_mask = _skip_structures(batch, net <= params.max_mean_force_norm, noise, structure_mask)
    moved = torch.ones_like(structure_mask[batch.batch]) if params.all_atoms else batch.fixed == 0  # [N]
    batch.pos = torch.where(moved[:, None], batch.pos + noise, batch.pos)
    batch.noise_vec = noise
    batch.denoising_pos_forward = True
    batch.dens_batch_mask = structure_mask
    return batch


def is_denoising(batch) -> bool:
    return bool(getattr(batch, "denoising_pos_forward", False))


def denoising_force_loss(
    pred: torch.Tensor,
    batch,
    force_target: torch.Tensor,
    force_coefficient: float,
    noise_coefficient: float,
    std: float,
    loss_fn,
    free_atoms_only: bool,
    all_atoms: bool,
) -> torch.Tensor:
    """The ``forces`` loss term of a DeNS batch: ``pred`` ``[N, 3]`` against the noise over
    ``std`` on the noisy atoms and ``force_target`` ``[N, 3]`` (normalised forces) elsewhere.

    With a ``noise_mask``: the mean over atoms of ``|pred - target|`` weighted by
    ``noise_coefficient`` on noisy atoms and ``force_coefficient`` on the others; without one
    (every atom noisy): ``noise_coefficient * loss_fn`` (the configured force loss). Atoms: the
    free ones with ``free_atoms_only`` (plus the noisy fixed ones with ``all_atoms``)."""
    noise_target = batch.noise_vec / std  # [N, 3]
    mask = batch.fixed == 0 if free_atoms_only else torch.ones_like(batch.fixed, dtype=torch.bool)  # [N]
    noise_mask = getattr(batch, "noise_mask", None)
    if free_atoms_only and all_atoms:
        mask = mask | noise_mask if noise_mask is not None else torch.ones_like(mask)
    if noise_mask is None:
        natoms = torch.repeat_interleave(batch.natoms, batch.natoms)[mask]
        return noise_coefficient * loss_fn(pred[mask], noise_target[mask], natoms=natoms)
    noisy = noise_mask[:, None]  # [N, 1]
    target = torch.where(noisy, noise_target, force_target)
    weight = torch.where(noisy, noise_coefficient, force_coefficient).to(pred.dtype)  # [N, 1]
    per_atom = (pred - target).norm(dim=-1, keepdim=True) * weight  # [N, 1]
    return per_atom[mask].mean()


def denoising_metrics(out: dict, batch, force_normalizer, std: float, free_atoms_only: bool) -> dict:
    """Training metrics of a DeNS batch, kept apart from the ordinary ones (whose running means
    would mix noise and forces): ``denoising_pos_mae`` (A, noisy atoms) and
    ``denoising_force_mae`` (eV/A, the other atoms), each ``(sum of absolute errors, number of
    components)``; ``force_normalizer`` turns normalised force predictions into eV/A."""
    pred = out["forces"].detach()  # [N, 3]
    mask = batch.fixed == 0 if free_atoms_only else torch.ones_like(batch.fixed, dtype=torch.bool)
    noise_mask = getattr(batch, "noise_mask", None)
    if noise_mask is None:
        noise_mask = torch.ones_like(mask)
    results = {}
    noisy = mask & noise_mask
    if noisy.any():
        error = (pred[noisy] * std - batch.noise_vec[noisy]).abs()
        results["denoising_pos_mae"] = (float(error.sum()), error.numel())
    clean = mask & ~noise_mask
    if clean.any():
        error = (force_normalizer(pred[clean]) - batch.forces[clean]).abs()
        results["denoising_force_mae"] = (float(error.sum()), error.numel())
    return results
