"""Training: the forces trainer, its learning-rate schedules and weight-decay groups, Noisy Nodes,
OC20 total energies."""

from .noisy_nodes import NoisyNodesLmdbDataset
from .param_groups import no_weight_decay_names, parameter_groups
from .schedule import CosineSchedule, LRScheduler, MultistepSchedule, WarmupSchedule
from .total_energy import OC20TotalEnergyLmdbDataset
from .trainer import ForcesTrainer

__all__ = [
    "CosineSchedule",
    "ForcesTrainer",
    "LRScheduler",
    "MultistepSchedule",
    "NoisyNodesLmdbDataset",
    "OC20TotalEnergyLmdbDataset",
    "WarmupSchedule",
    "no_weight_decay_names",
    "parameter_groups",
]
