"""EquiformerV2: eSCN SO(2) convolutions, attention re-normalisation, separable S2 activation
and separable layer norm. A backbone, its heads, and the composite released model."""

from .backbone import EquiformerV2Backbone
from .denoising import EquiformerV2DeNS
from .heads import EquiformerV2EnergyHead, EquiformerV2ForceHead
from .model import EquiformerV2

__all__ = [
    "EquiformerV2",
    "EquiformerV2Backbone",
    "EquiformerV2DeNS",
    "EquiformerV2EnergyHead",
    "EquiformerV2ForceHead",
]
