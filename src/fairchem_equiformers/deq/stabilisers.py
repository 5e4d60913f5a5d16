"""Stabilisers of deep equilibrium models.

* :func:`apply_weight_norm`: ``w = g * v / ||v||`` (Salimans & Kingma 2016) on every linear map of
  a module: ``nn.Linear`` (which includes the SO(2) convolutions' maps and the radial MLPs), the
  equivariant :class:`~fairchem_equiformers.primitives.SO3Linear` (one norm per degree and
  output channel) and e3nn's ``o3.Linear`` on irreps (Equiformer V1; one norm per output
  channel of each output irrep block, over all its input paths), so a DEQ's Lipschitz constant
  is set by the learnable scales ``g``;
* :func:`jacobian_penalty`: Hutchinson estimate of ``||J_f(z*)||_F^2 / dim(z)`` (Bai et al. 2021),
  to keep the fixed-point map contractive;
* :func:`fixed_point_correction_loss`: one differentiable step from states along the solver path
  should land on the (differentiable) fixed point. The reference applies the task loss to decoded intermediate
  states; here the distance is measured in feature space, which needs no labels, so it fits
  fairchem's loss configuration (the model adds it to ``deq_auxiliary_loss``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from e3nn import o3
from torch import nn
from torch.nn.utils import parametrize

from fairchem_equiformers.primitives import SO3Linear

from .solvers import GraphInnerProduct


class WeightNorm(nn.Module):
    """Parametrisation ``weight = scale * direction / ||direction||``, the norm over the last
    (input) dimension; ``scale: [..., 1]`` starts at the weight's norms, so applying it leaves
    the layer's function unchanged."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(weight.detach().norm(dim=-1, keepdim=True))

    def forward(self, direction: torch.Tensor) -> torch.Tensor:
        norm = direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(direction.dtype).tiny)
        return self.scale * direction / norm


class IrrepsWeightNorm(nn.Module):
    """Weight norm of an e3nn ``o3.Linear``, whose weights are one flat vector ``[W]`` of blocks
    ``[mul_in, mul_out]`` (one per path ``irrep_in -> irrep_out``): ``weight = scale[group] *
    direction / ||direction||_group`` with one group per output channel of each output irrep
    block (all paths into it, all input channels). Every weight only scales an equivariant path,
    so the layer stays equivariant; ``scale: [G]`` starts at the groups' norms, so applying it
    leaves the layer's function unchanged."""

    def __init__(self, linear: o3.Linear) -> None:
        super().__init__()
        out_offsets = [0]
        for mul, _ in linear.irreps_out:
            out_offsets.append(out_offsets[-1] + mul)
        groups = []
        for ins in linear.instructions:
            if ins.i_in == -1:  # a bias (not part of ``weight``)
                continue
            mul_in, mul_out = ins.path_shape
            channel = out_offsets[ins.i_out] + torch.arange(mul_out)  # [mul_out]
            groups.append(channel.repeat(mul_in))  # row-major [mul_in, mul_out]
        group = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long)
        if group.numel() != linear.weight.numel():
            raise ValueError(f"unexpected o3.Linear weight layout: {linear}")
        self.num_groups = out_offsets[-1]
        self.register_buffer("group", group, persistent=False)
        self.scale = nn.Parameter(self._norms(linear.weight.detach()))

    def _norms(self, direction: torch.Tensor) -> torch.Tensor:
        squares = direction.new_zeros(self.num_groups).index_add(0, self.group, direction.pow(2))
        return squares.sqrt()  # [G]

    def forward(self, direction: torch.Tensor) -> torch.Tensor:
        norm = self._norms(direction).clamp_min(torch.finfo(direction.dtype).tiny)
        return (self.scale / norm)[self.group] * direction


def _has_weight(module: nn.Module) -> bool:
    """A module with its own (not yet parametrised, non-empty) ``weight`` parameter."""
    if parametrize.is_parametrized(module, "weight"):
        return False
    weight = module._parameters.get("weight")
    return isinstance(weight, nn.Parameter) and weight.numel() > 0


def apply_weight_norm(module: nn.Module) -> list[str]:
    """Weight-normalise every ``nn.Linear``, ``SO3Linear`` and e3nn ``o3.Linear`` (with its own
    weights) in ``module``; returns their names."""
    linears = [
        (name, sub)
        for name, sub in module.named_modules()
        if isinstance(sub, (nn.Linear, SO3Linear, o3.Linear)) and _has_weight(sub)
    ]
    for _, sub in linears:
        norm = IrrepsWeightNorm(sub) if isinstance(sub, o3.Linear) else WeightNorm(sub.weight)
        parametrize.register_parametrization(sub, "weight", norm)
    return [name for name, _ in linears]


def jacobian_penalty(output: torch.Tensor, z_in: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
    """``E_v ||v^T J||^2 / dim(z)`` with ``v ~ N(0, I)``, ``J = d output / d z_in``, estimated
    with ``num_samples`` vectors; differentiable (``create_graph``), for use as a loss."""
    total = output.new_zeros(())
    for _ in range(num_samples):
        v = torch.randn_like(output)
        (vjp,) = torch.autograd.grad(output, z_in, v, retain_graph=True, create_graph=True)
        total = total + vjp.pow(2).sum() / v.numel()
    return total / num_samples


def fixed_point_correction_loss(
    f: Callable[[torch.Tensor], torch.Tensor],
    states: list[torch.Tensor],
    fixed_point: torch.Tensor,
    batch: torch.Tensor,
    num_graphs: int,
) -> torch.Tensor:
    """Mean over ``states`` and structures of ``||f(state) - z*||^2 / ||z*||^2`` per structure.
    The states are detached; the fixed point keeps its gradient (pass the model's differentiable
    fixed point), so one step from a state and the fixed point are pulled together.
    Shapes: ``states[i], fixed_point: [N, ...]``."""
    graphs = GraphInnerProduct(batch, num_graphs)
    target = fixed_point.flatten(1)  # [N, D]
    scale = graphs.dot(target, target).detach().clamp_min(torch.finfo(target.dtype).tiny)  # [B]
    losses = []
    for state in states:
        error = f(state.detach()).flatten(1) - target
        losses.append((graphs.dot(error, error) / scale).mean())
    return torch.stack(losses).mean()
