"""E2Former: equivariant attention with node-level (Wigner-6j recoupled) tensor products."""

from .model import E2Former

__all__ = ["E2Former"]
