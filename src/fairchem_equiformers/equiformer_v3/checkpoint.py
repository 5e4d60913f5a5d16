"""Loading official EquiformerV3 weights (``equiformer_v3`` state dicts and checkpoints).

Accepted, in ``model.load_state_dict`` and in fairchem's ``--checkpoint`` path: the official
layout (``blocks.0.ga.so2_linear_1.fc_m0.weight``, ``energy_block.*``, ``force_block.*``,
``stress_block.*``), with any number of ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``)
prefixes, and fairchem's backbone+heads layout (``backbone.*``, ``output_heads.<name>.*``).
The official buffers holding constants this package computes itself (Wigner index tables,
grids, basis offsets) are checked where a mismatch would mean a different model (grid points,
radial basis, cutoff) and dropped; ``SO3Linear`` biases ``[1, 1, C]`` become ``[C]``. Every
other key maps one to one; a key that matches nothing is an error naming it, and missing keys
are torch's (strict) error.

Two exceptions, each skipped with a warning, so that a direct DeNS checkpoint starts a gradient
fine-tune (the official recipe): a gradient model (``direct_prediction: false``) has no direct
heads, so a checkpoint's ``force_block.*`` / ``stress_block.*`` are not loaded; and a model
without DeNS (``EquiformerV3``, not ``EquiformerV3DeNS``) has no force encoding or denoising
head, so a DeNS checkpoint's ``force_embedding.*`` / ``dens_block.*`` are not loaded.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fairchem_equiformers.primitives import S2Grid

# Official buffers that hold constants this package computes itself.
DERIVED_BUFFERS = {
    "wigner_index_to_m_array", "wigner_inv_rescale", "expand_index", "balance_degree_weight",
    "to_grid_mat", "from_grid_mat", "zero_padded_change_matrix", "offset",
}  # fmt: skip
PREFIXES = ("module.", "_orig_mod.")
DIRECT_HEADS = ("force_block.", "stress_block.")
DENS_PARTS = ("force_embedding.", "dens_block.")


def canonical_key(key: str) -> str:
    """Official, compiled, DDP or backbone+heads key -> this package's key."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    if key.startswith("backbone."):
        return key[len("backbone.") :]
    if key.startswith("output_heads."):  # output_heads.<name>.<head attribute>...
        return key.split(".", 2)[2]
    return key


def _check_constant(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Raise where a dropped constant shows that the checkpoint's model differs from ``model``."""
    parent_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    if leaf == "offset" and parent_name == "distance_expansion":
        ours = model.distance_expansion
        if value.numel() != ours.num_basis:
            raise ValueError(
                f"checkpoint has {value.numel()} radial basis functions (distance_expansion.offset), "
                f"the model num_radial_basis={ours.num_basis}"
            )
        if abs(float(value[-1]) - model.max_radius) > 1e-4:
            raise ValueError(
                f"checkpoint was trained with max_radius={float(value[-1])}, model has {model.max_radius}"
            )
        return
    if leaf == "to_grid_mat":
        try:
            parent = model.get_submodule(parent_name.removesuffix(".so3_grid"))
        except AttributeError:
            return
        grid = getattr(parent, "so3_grid", None) or getattr(parent, "grid", None)
        if isinstance(grid, S2Grid) and value.shape[0] != grid.to_grid_matrix.shape[0]:
            raise ValueError(
                f"{name}: the checkpoint's S2 grid has {value.shape[0]} points, the model's "
                f"{grid.to_grid_matrix.shape[0]} ({grid.resolution}); set attn_grid_resolution_list / "
                "ffn_grid_resolution_list as in the checkpoint's config"
            )


def register_official_layout(model: nn.Module) -> None:
    """Install a load-state-dict pre-hook on ``model`` that rewrites the official layouts (it
    runs also when the model is loaded through a wrapper such as DDP)."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = module.state_dict()
        unknown, skipped, skipped_dens = [], [], []
        for key in [k for k in state_dict if k.startswith(prefix)]:
            value = state_dict.pop(key)
            name = canonical_key(key[len(prefix) :])
            if name in own:
                if (
                    value.dim() == 3 and own[name].dim() == 1 and name.endswith(".bias")
                ):  # SO3Linear [1, 1, C]
                    value = value.reshape(-1)
                state_dict[prefix + name] = value
            elif name.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
                _check_constant(module, name, value)
            elif name.startswith(DIRECT_HEADS) and not module.direct_prediction:
                skipped.append(key)
            elif name.startswith(DENS_PARTS) and not hasattr(module, "force_embedding"):
                skipped_dens.append(key)
            else:
                unknown.append(key)
        if skipped:
            logging.warning(
                f"{type(module).__name__} is a gradient model (direct_prediction: false), so the "
                f"checkpoint's direct heads ({len(skipped)} force_block.* / stress_block.* tensors) are "
                "not loaded: forces and stress are derivatives of the loaded energy model"
            )
        if skipped_dens:
            logging.warning(
                f"{type(module).__name__} has no DeNS inputs, so the checkpoint's force encoding and "
                f"denoising head ({len(skipped_dens)} force_embedding.* / dens_block.* tensors) are "
                "not loaded"
            )
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise KeyError(
                f"{len(unknown)} checkpoint key(s) match no parameter of {type(module).__name__}: {shown}. "
                "Check that the model section (num_layers, lmax, mmax, norm_type, activations, "
                "use_add_merge, use_rad_l_parametrization, regress_stress, ...) matches the checkpoint's."
            )

    model._register_load_state_dict_pre_hook(hook, with_module=True)
