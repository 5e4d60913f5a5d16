"""Heads shared by every family: the gradient head (forces and stress from the energy).

Each family's own heads (its energy head, its direct-force head) live beside its backbone.
A backbone's ``forward(data)`` returns ``emb``: ``node_embedding`` (the family's node features),
``graph`` (what its direct heads need), ``pos`` and ``strain`` (see ``gradient.py``), and
``node_energy_reference`` ``[N]`` where the backbone holds element references."""

from .gradient import GradientHead, check_gradient_outputs, energy_gradients, gradient_inputs, strained

__all__ = ["GradientHead", "check_gradient_outputs", "energy_gradients", "gradient_inputs", "strained"]
