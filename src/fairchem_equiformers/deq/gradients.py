"""Gradients through a fixed point ``z* = f(z*)``.

* phantom gradient (Geng et al. 2021): ``k`` evaluations of ``f`` with autograd from the detached
  fixed point; the gradient is that of those ``k`` steps, a truncation of the implicit gradient's
  Neumann series ``(I - J)^-1 = sum_i J^i`` after ``k`` terms (``k = 1``: ``df/dtheta`` alone);
* implicit differentiation (IFT): one evaluation ``y = f(z*)`` from the detached fixed point whose
  incoming gradient ``v`` is replaced by the solution of the backward fixed point
  ``g = g J_f(z*) + v``, i.e. ``g = v (I - J)^-1``: the exact gradient of the fixed point;
* unrolled back-propagation: the solver's iterations recorded by autograd (``solve(...,
  track_grad=True)``), used by the model directly.

Both functions return the detached fixed point as a leaf (``z_in``, for the Jacobian penalty)
and the map's first output from it. When the backward pass is itself recorded
(``create_graph=True``: a force loss on ``-dE/dpos``), the IFT's adjoint keeps its solved value,
so the forces are exact, while its dependence on the parameters is that of its first Neumann
term (a phantom second derivative): recording every backward iteration instead costs their memory
and time (``benchmarks/bench_deq.py --gradients``, see ``docs/deq.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .solvers import SolverSettings, solve

GRADIENTS = ("phantom", "ift", "unrolled")


def _first_step(f: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor):
    z_in = z_star.detach().requires_grad_()
    return z_in, f(z_in)


def phantom_gradient(
    f: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor, steps: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_in, f(z_in), f^steps(z_in))`` with ``z_in`` the detached ``z_star``."""
    z_in, first = _first_step(f, z_star)
    out = first
    for _ in range(steps - 1):
        out = f(out)
    return z_in, first, out


def implicit_gradient(
    f: Callable[[torch.Tensor], torch.Tensor],
    z_star: torch.Tensor,
    batch: torch.Tensor,
    num_graphs: int,
    settings: SolverSettings,
    method: str = "anderson",
    structure_ids: Sequence | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_in, y = f(z_in))``; back-propagating through ``y`` gives the implicit gradient.

    The backward fixed point is solved per structure with ``method`` and ``settings``, never
    itself recorded (see the module docstring)."""
    z_in, out = _first_step(f, z_star)
    if not out.requires_grad:
        return z_in, out
    solving = False

    def backward_fixed_point(incoming: torch.Tensor) -> torch.Tensor:
        nonlocal solving
        if solving:  # the vector-Jacobian products below pass through this tensor too
            return incoming
        solving = True
        try:

            def transposed_map(g: torch.Tensor) -> torch.Tensor:  # g -> g J + incoming
                (vjp,) = torch.autograd.grad(out, z_in, g, retain_graph=True)
                return vjp + incoming.detach()

            result = solve(
                transposed_map, incoming.detach(), batch, num_graphs, settings, method, structure_ids
            )
        finally:
            solving = False
        # the adjoint's value as solved; when this backward pass is itself recorded (a force loss
        # on -dE/dpos), its dependence on the parameters is that of its first Neumann term
        return incoming + (result.z - incoming).detach()

    out.register_hook(backward_fixed_point)
    return z_in, out
