"""EquiformerV3: backbone, heads and the composite model (registered with fairchem)."""

from .backbone import EquiformerV3Backbone
from .denoising import EquiformerV3DeNS
from .heads import EquiformerV3EnergyHead, EquiformerV3ForceHead, EquiformerV3StressHead
from .model import EquiformerV3

__all__ = [
    "EquiformerV3",
    "EquiformerV3Backbone",
    "EquiformerV3DeNS",
    "EquiformerV3EnergyHead",
    "EquiformerV3ForceHead",
    "EquiformerV3StressHead",
]
