"""Equiformer (V1): equivariant graph attention on e3nn irreps features."""

from .model import EquiformerV1

__all__ = ["EquiformerV1"]
