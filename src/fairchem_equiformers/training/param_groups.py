"""Which parameters get weight decay: the model's own ``no_weight_decay()``, the only rule.

Each family declares its rule on its backbone (EquiformerV2: the official list, biases of linear
layers and every norm parameter; each other family its own), a DEQ adds its norms and
weight-norm scales, and fairchem's models bring theirs. For fairchem's ``hydra`` model the rule
is its backbone's, applied to the backbone and to every head."""

from __future__ import annotations

from fairchem.core.models.base import HydraModel
from torch import nn


def _hydra_rule(model: HydraModel) -> set[str]:
    backbone = model.backbone
    family = getattr(backbone, "backbone", backbone)  # a DEQBackbone's wrapped backbone
    exempt = {f"backbone.{name}" for name in backbone.no_weight_decay()}
    for head_name, head in model.output_heads.items():
        exempt |= {f"output_heads.{head_name}.{name}" for name in type(family).no_weight_decay(head)}
    return exempt


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters exempt from weight decay."""
    listed = _hydra_rule(model) if isinstance(model, HydraModel) else set(model.no_weight_decay())
    return {
        name
        for name, _ in model.named_parameters()
        if name in listed or any(name.endswith("." + n) for n in listed)
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
