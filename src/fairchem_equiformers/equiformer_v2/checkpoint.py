"""Loading released EquiformerV2 weights.

Accepted layouts, in ``model.load_state_dict`` and in fairchem's ``--checkpoint`` path:

* the released flat layout (``blocks.0.ga.so2_conv_1.fc_m0.weight``, ``energy_block.*``,
  ``force_block.*``) with any number of ``module.`` prefixes, including the thousands of
  per-block copies of constant buffers (grids, index tables), which are checked and dropped;
* fairchem's backbone+heads layout (``backbone.*``, ``output_heads.energy.energy_block.*``,
  ``output_heads.forces.force_block.*``);
* fairchem's hydra DeNS layout, into ``EquiformerV2DeNS`` (``backbone.*`` with
  ``backbone.force_embedding.*``, ``output_heads.energy.scalar_block.*`` -> ``energy_block.*``,
  ``output_heads.forces.vector_block.*`` -> ``force_block.*``,
  ``output_heads.forces.denoising_pos_block.*`` -> ``denoising_pos_block.*``).

Parameter names are otherwise identical, so every parameter maps one to one. Keys that match
nothing in the model raise an error naming them; missing keys are reported by torch (or by
fairchem's strict loading).

One exception: a model with conservative forces (``direct_forces=False``) has no force head,
and a checkpoint's ``force_block.*`` (released models predict forces directly) is skipped with
a warning, so that released weights can start a conservative fine-tune.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

# Buffers of the reference implementation that hold constants this package computes itself.
DERIVED_BUFFERS = {
    "to_grid_mat", "from_grid_mat", "l_harmonic", "m_harmonic", "m_complex", "res_size",
    "to_m", "m_size", "expand_index", "balance_degree_weight",
}  # fmt: skip
HEAD_PREFIXES = {
    "output_heads.energy.energy_block.": "energy_block.",
    "output_heads.forces.force_block.": "force_block.",
    "output_heads.energy.scalar_block.": "energy_block.",  # DeNS heads
    "output_heads.forces.vector_block.": "force_block.",
    "output_heads.forces.denoising_pos_block.": "denoising_pos_block.",
    "backbone.": "",
}


def canonical_key(key: str) -> str:
    """Released or backbone+heads key -> this package's key (prefixes removed)."""
    while key.startswith("module."):
        key = key[len("module.") :]
    for old, new in HEAD_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _check_distance_basis(model: nn.Module, offsets: torch.Tensor) -> None:
    ours = model.distance_expansion
    if offsets.numel() != ours.num_basis:
        raise ValueError(
            f"checkpoint has {offsets.numel()} Gaussians in distance_expansion.offset but the "
            f"model was built with num_distance_basis={ours.num_basis}; set num_distance_basis: "
            f"{offsets.numel()} (released EquiformerV2 checkpoints use 600 whatever their config says)"
        )
    if abs(float(offsets[-1]) - model.max_radius) > 1e-4:
        raise ValueError(
            f"checkpoint was trained with max_radius={float(offsets[-1])}, model has "
            f"max_radius={model.max_radius}"
        )


def _check_grid(model: nn.Module, key: str, matrix: torch.Tensor) -> None:
    """The reference stores one grid per (l, m); check the one our attention uses."""
    lmax, mmax = model.layout.lmax, model.layout.mmax
    if not key.endswith(f"SO3_grid.{lmax}.{mmax}.to_grid_mat"):
        return
    if tuple(matrix.shape[:2]) != tuple(model.edge_grid.resolution):
        raise ValueError(
            f"checkpoint's S2 grid is {tuple(matrix.shape[:2])} points but the model's is "
            f"{tuple(model.edge_grid.resolution)}: set grid_resolution to match the checkpoint's config"
        )


def register_checkpoint_compatibility(model: nn.Module) -> None:
    """Install a load-state-dict pre-hook on ``model`` that rewrites released layouts.

    It runs whenever the model's weights are loaded, also through wrappers such as
    DistributedDataParallel (the hook sees the model's own prefix)."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = set(module.state_dict().keys())
        unknown, skipped_force_head = [], []
        for key in [k for k in state_dict if k.startswith(prefix)]:
            value = state_dict.pop(key)
            name = canonical_key(key[len(prefix) :])
            leaf = name.rsplit(".", 1)[-1]
            if name == "distance_expansion.offset":
                _check_distance_basis(module, value)
            elif leaf in DERIVED_BUFFERS:
                _check_grid(module, name, value)
            elif name in own:
                state_dict[prefix + name] = value
            elif name.startswith("force_block.") and getattr(module, "conservative", False):
                skipped_force_head.append(key)
            else:
                unknown.append(key)
        if skipped_force_head:
            logging.warning(
                f"{type(module).__name__} has conservative forces (direct_forces=False), so the "
                f"checkpoint's direct force head ({len(skipped_force_head)} force_block.* tensors) "
                "is not loaded: forces are -dE/dpos of the loaded energy model"
            )
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise KeyError(
                f"{len(unknown)} checkpoint key(s) match no parameter of {type(module).__name__}: "
                f"{shown}. Check that the model section (num_layers, lmax_list, regress_forces, "
                "direct_forces, load_energy_lin_ref, share_atom_edge_embedding, ...) matches the "
                "checkpoint's."
            )

    model._register_load_state_dict_pre_hook(hook, with_module=True)
