"""The official EquiformerV1/V2/V3 weight-decay rule, shared by their ``no_weight_decay()``."""

from __future__ import annotations

from torch import nn


def weight_decay_exempt(model: nn.Module, linears: tuple[type, ...], whole: tuple[type, ...]) -> set[str]:
    """Names of ``model``'s parameters exempt from weight decay: every parameter of a module of a
    ``whole`` type (norms, embeddings) and every parameter but the weight of a ``linears`` one."""
    exempt = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            is_bias = isinstance(module, linears) and param_name != "weight"
            if is_bias or isinstance(module, whole):
                exempt.add(f"{module_name}.{param_name}" if module_name else param_name)
    return exempt
