"""Stabilisers of deep equilibrium models.

* :func:`apply_weight_norm`: ``w = g * v / ||v||`` (Salimans & Kingma 2016) on every linear map of
  a module: ``nn.Linear`` (which includes the SO(2) convolutions' maps and the radial MLPs) and
  the equivariant :class:`~fairchem_equiformers.primitives.SO3Linear` (one norm per degree and
  output channel), so a DEQ's Lipschitz constant is set by the learnable scales ``g``;
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


def apply_weight_norm(module: nn.Module) -> list[str]:
    """Weight-normalise every ``nn.Linear`` and ``SO3Linear`` in ``module``; returns their names."""
    linears = [
        (name, sub)
        for name, sub in module.named_modules()
        if isinstance(sub, (nn.Linear, SO3Linear)) and not parametrize.is_parametrized(sub, "weight")
    ]
    for _, sub in linears:
        parametrize.register_parametrization(sub, "weight", WeightNorm(sub.weight))
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
