"""Which parameters get weight decay (the official EquiformerV2 rule, for any model)."""

from __future__ import annotations

from torch import nn

# Parameters of these modules are never decayed: normalisation layers (torch's and every
# equivariant norm, whose class names contain "Norm") and radial bases with learnable widths.
NO_DECAY_MODULE_MARKERS = ("Norm", "RadialBasis", "Smearing")
NO_DECAY_PARAMETER_NAMES = {"bias", "affine_weight", "affine_bias", "mean_shift"}


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of parameters exempt from weight decay:
    biases, every parameter of a normalisation layer or a radial basis, and whatever the model
    lists in ``no_weight_decay()``. Everything else (linear and SO(2) weights, embeddings,
    attention vectors) is decayed."""
    exempt_ids = set()
    for module in model.modules():
        marked = any(marker in type(module).__name__ for marker in NO_DECAY_MODULE_MARKERS)
        for name, param in module.named_parameters(recurse=False):
            if marked or name in NO_DECAY_PARAMETER_NAMES or name.endswith("_bias"):
                exempt_ids.add(id(param))
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return {
        name
        for name, param in model.named_parameters()
        if id(param) in exempt_ids or name in listed or any(name.endswith("." + n) for n in listed)
    }


def parameter_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[str]]:
    """AdamW parameter groups ``[no decay, decay]`` and the names of the exempt parameters."""
    exempt = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return groups, sorted(n for n, p in model.named_parameters() if p.requires_grad and n in exempt)
