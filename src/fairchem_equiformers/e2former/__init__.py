"""E2Former: equivariant attention with node-level (Wigner-6j recoupled) tensor products, as a
backbone (``E2FormerBackbone``) plus heads (``E2FormerEnergyHead``, ``E2FormerForceHead``) and the
composite model (``E2Former``)."""

from .backbone import E2FormerBackbone
from .heads import E2FormerEnergyHead, E2FormerForceHead
from .model import E2Former

__all__ = ["E2Former", "E2FormerBackbone", "E2FormerEnergyHead", "E2FormerForceHead"]
