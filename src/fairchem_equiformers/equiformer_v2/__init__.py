"""EquiformerV2: eSCN SO(2) convolutions, attention re-normalisation, separable S2 activation
and separable layer norm."""

from .model import EquiformerV2

__all__ = ["EquiformerV2"]
