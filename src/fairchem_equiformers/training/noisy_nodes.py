"""Noisy Nodes for OC20 IS2RE with the IS2RS auxiliary task (the Equiformer paper's best OC20
result; reference atomicarchitects/equiformer, ``--use-auxiliary-task`` with
``use_interpolate_init_relaxed_pos``, after Godwin et al.'s Noisy Nodes).

For a training sample, with probability ``perturbed_fraction`` (0.5 in the reference) every free
atom is moved to a random point on its straight path from the initial to the relaxed position
(a fraction ``t ~ U(0, 1)`` drawn per atom) plus Gaussian noise of ``noise_std`` A per component
(0.3 A); the other samples keep their initial positions. The model sees these positions, still
predicts the relaxed energy, and an auxiliary per-atom head predicts ``displacement = pos_relaxed -
pos``, the step from the positions it sees to the relaxed ones (for a perturbed atom
``t (pos_relaxed - pos_initial) - noise``). Fixed atoms (``fixed == 1``, the subsurface atoms of OC20,
which do not move in the relaxation) are never moved; their displacement is zero and fairchem's
``train_on_free_atoms`` leaves them out of the loss. Displacements are minimum-image vectors, so
an atom wrapped through the cell during the relaxation does not become a jump of one cell length.

Validation, test and prediction see the clean initial positions, and ``displacement`` is then the
IS2RS target ``pos_relaxed - pos_initial``, so the auxiliary head can be evaluated there too.

Why a dataset subclass and not a transform: fairchem 1.10's ``DataTransforms`` looks transforms
up by name inside ``fairchem.core.modules.transforms`` (``eval``), so a plugin cannot add one
without patching the host module; a registered dataset is the host's supported extension point
(``format: fairchem_equiformers.NoisyNodesLmdbDataset``). The perturbation is a pure function of
(dataset ``seed``, epoch, sample index), so runs are reproducible whatever the number of data
workers. A dataset does not know its split or the epoch, and fairchem hands the train split's
settings to the val/test splits, so the dataset stays clean until ``set_epoch`` is called, which
``fairchem_equiformers.ForcesTrainer`` does for its training set only, before every epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from fairchem.core.common.registry import registry
from fairchem.core.datasets import LmdbDataset

# The reference's settings (``interpolate_init_relaxed_pos``).
NOISE_STD = 0.3  # A, per Cartesian component
PERTURBED_FRACTION = 0.5  # share of training samples that are moved (the others stay initial)


def minimum_image(vectors: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """``vectors [N, 3]`` shifted by whole cell vectors (rows of ``cell [3, 3]``) to the shortest
    periodic image (exact for the displacements of relaxations, which are short)."""
    fractional = vectors @ torch.linalg.inv(cell)
    return (fractional - torch.round(fractional)) @ cell


def noisy_nodes_positions(
    pos: torch.Tensor,
    pos_relaxed: torch.Tensor,
    cell: torch.Tensor,
    free: torch.Tensor,
    rng: np.random.Generator,
    noise_std: float = NOISE_STD,
    perturbed_fraction: float = PERTURBED_FRACTION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions the model sees ``[N, 3]`` and the displacement target ``[N, 3]`` (relaxed
    minus seen, minimum image) for one structure.

    ``pos``/``pos_relaxed``: initial and relaxed positions ``[N, 3]``; ``cell``: ``[3, 3]``;
    ``free``: ``[N]`` bool, the atoms that may move; ``rng`` draws everything."""
    path = minimum_image(pos_relaxed - pos, cell)  # [N, 3] initial -> relaxed
    seen = pos
    if rng.random() < perturbed_fraction:
        fraction = torch.from_numpy(rng.random((len(pos), 1))).to(pos.dtype)  # [N, 1], U(0, 1)
        noise = torch.from_numpy(rng.normal(0.0, noise_std, (len(pos), 3))).to(pos.dtype)
        moved = pos + (1 - fraction) * path + noise  # = t pos + (1 - t) pos_relaxed + noise
        seen = torch.where(free[:, None], moved, pos)
    return seen, minimum_image(pos + path - seen, cell)


@registry.register_dataset("fairchem_equiformers.NoisyNodesLmdbDataset")
class NoisyNodesLmdbDataset(LmdbDataset):
    """fairchem's ``lmdb`` dataset of IS2RE records (``pos``, ``pos_relaxed``, ``fixed``, ``cell``)
    with Noisy Nodes positions and a ``displacement`` target (see the module docstring).

    Config: the ``lmdb`` dataset's keys, plus ``noisy_nodes: {noise_std: 0.3,
    perturbed_fraction: 0.5}`` (both optional) and fairchem's dataset ``seed`` (default 0)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        options = dict(config.get("noisy_nodes") or {})
        self.noise_std = float(options.pop("noise_std", NOISE_STD))
        self.perturbed_fraction = float(options.pop("perturbed_fraction", PERTURBED_FRACTION))
        if options:
            raise ValueError(
                f"unknown noisy_nodes key(s) {sorted(options)}; known: noise_std, perturbed_fraction"
            )
        if not self.noise_std >= 0 or not 0 <= self.perturbed_fraction <= 1:
            raise ValueError(
                f"noisy_nodes needs noise_std >= 0 and 0 <= perturbed_fraction <= 1, got "
                f"noise_std={self.noise_std}, perturbed_fraction={self.perturbed_fraction}"
            )
        self.seed = int(config.get("seed", 0))
        self.epoch: int | None = None  # None: clean initial positions (val/test/predict)

    def set_epoch(self, epoch: int) -> None:
        """Perturb from now on, with the random draws of ``epoch`` (the training set only)."""
        self.epoch = int(epoch)

    def __getitem__(self, idx: int):
        data = super().__getitem__(idx)
        missing = [key for key in ("pos_relaxed", "fixed", "cell") if key not in data]
        if missing:
            raise KeyError(
                f"NoisyNodesLmdbDataset needs IS2RE records with pos_relaxed, fixed and cell; "
                f"record {idx} of {self.path} has no {missing}"
            )
        if self.epoch is None:
            seen, displacement = data.pos, minimum_image(data.pos_relaxed - data.pos, data.cell[0])
        else:
            rng = np.random.default_rng([self.seed, self.epoch, int(self.indices[idx])])
            seen, displacement = noisy_nodes_positions(
                data.pos, data.pos_relaxed, data.cell[0], data.fixed == 0, rng,
                self.noise_std, self.perturbed_fraction,
            )  # fmt: skip
        data.pos, data.displacement = seen, displacement
        return data
