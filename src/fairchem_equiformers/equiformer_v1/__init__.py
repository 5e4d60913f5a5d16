"""Equiformer (V1): equivariant graph attention on e3nn irreps features. A backbone, its heads,
and the composite model."""

from .backbone import EquiformerV1Backbone
from .heads import (
    EquiformerV1DipoleHead,
    EquiformerV1DisplacementHead,
    EquiformerV1EnergyHead,
    EquiformerV1ForceHead,
)
from .model import EquiformerV1

__all__ = [
    "EquiformerV1",
    "EquiformerV1Backbone",
    "EquiformerV1DipoleHead",
    "EquiformerV1DisplacementHead",
    "EquiformerV1EnergyHead",
    "EquiformerV1ForceHead",
]
