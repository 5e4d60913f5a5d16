"""fairchem-equiformers: the Equiformer family of interatomic potentials as a FairChem plugin.

Importing the package registers its models (each family's backbone, heads and composite model,
the DEQ wrapper), trainer and dataset with fairchem's registry under their full class paths
(e.g. ``fairchem_equiformers.EquiformerV2``), so the same name works in a config for the stock
``fairchem`` CLI (which imports the package on demand) and in Python after import.
"""

from .deq import DEQ, DEQBackbone, DEQEquiformerV1, DEQEquiformerV2
from .e2former import E2Former, E2FormerBackbone, E2FormerEnergyHead, E2FormerForceHead
from .equiformer_v1 import (
    EquiformerV1,
    EquiformerV1Backbone,
    EquiformerV1DipoleHead,
    EquiformerV1DisplacementHead,
    EquiformerV1EnergyHead,
    EquiformerV1ForceHead,
)
from .equiformer_v2 import (
    EquiformerV2,
    EquiformerV2Backbone,
    EquiformerV2DeNS,
    EquiformerV2EnergyHead,
    EquiformerV2ForceHead,
)
from .equiformer_v3 import (
    EquiformerV3,
    EquiformerV3Backbone,
    EquiformerV3DeNS,
    EquiformerV3EnergyHead,
    EquiformerV3ForceHead,
    EquiformerV3StressHead,
)
from .heads import GradientHead
from .tools.allocator import keep_freed_memory
from .training import ForcesTrainer, NoisyNodesLmdbDataset, OC20TotalEnergyLmdbDataset

__all__ = [
    "DEQ",
    "DEQBackbone",
    "DEQEquiformerV1",
    "DEQEquiformerV2",
    "E2Former",
    "E2FormerBackbone",
    "E2FormerEnergyHead",
    "E2FormerForceHead",
    "EquiformerV1",
    "EquiformerV1Backbone",
    "EquiformerV1DipoleHead",
    "EquiformerV1DisplacementHead",
    "EquiformerV1EnergyHead",
    "EquiformerV1ForceHead",
    "EquiformerV2",
    "EquiformerV2Backbone",
    "EquiformerV2DeNS",
    "EquiformerV2EnergyHead",
    "EquiformerV2ForceHead",
    "EquiformerV3",
    "EquiformerV3Backbone",
    "EquiformerV3DeNS",
    "EquiformerV3EnergyHead",
    "EquiformerV3ForceHead",
    "EquiformerV3StressHead",
    "ForcesTrainer",
    "GradientHead",
    "NoisyNodesLmdbDataset",
    "OC20TotalEnergyLmdbDataset",
    "keep_freed_memory",
]
__version__ = "0.1.0"
