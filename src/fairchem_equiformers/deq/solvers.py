"""Fixed-point solvers for batches of graphs: Anderson acceleration, Broyden's method and plain
fixed-point iteration.

Every structure of a batch is its own problem: the map acts on each graph's nodes independently,
so residuals, convergence, Anderson's mixing coefficients and Broyden's inner products are all
computed per graph (through the batch vector). A structure that has converged is frozen at its
best iterate while the others go on. A structure that does not converge, or whose map turns
non-finite, falls back to its best iterate (the one with the smallest residual, the initial
state at worst) with a :class:`DEQConvergenceWarning` naming it; the result is never NaN when the
initial state is finite.

Convergence of structure b at iterate z: ``||f(z) - z||_b <= abs_tol + rel_tol * ||f(z)||_b``
with the L2 norm over all of the structure's node features.

Shapes: ``z: [N, ...]`` (any trailing shape), ``batch: [N]``, per-structure outputs ``[B]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch


class DEQConvergenceWarning(UserWarning):
    """A fixed-point solve stopped before some structures reached the tolerance."""


@dataclass(frozen=True)
class SolverSettings:
    """Tolerances and iteration limit of one solve (``max_iter`` evaluations of the map)."""

    abs_tol: float = 0.0
    rel_tol: float = 1e-3
    max_iter: int = 24

    def __post_init__(self) -> None:
        if not (self.abs_tol >= 0 and self.rel_tol >= 0):
            raise ValueError(
                f"solver tolerances must be >= 0, got abs_tol={self.abs_tol}, rel_tol={self.rel_tol}"
            )
        if self.abs_tol == 0 and self.rel_tol == 0:
            raise ValueError(
                "solver tolerances abs_tol and rel_tol are both 0: the solve could never converge"
            )
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"solver max_iter must be an integer >= 1, got {self.max_iter!r}")


@dataclass
class SolverResult:
    """``z``: the best iterate of every structure ``[N, ...]``; per structure ``[B]``: the map
    evaluations it used (``iterations``), the residuals of the returned iterate and whether it
    converged; ``states``: the iterates at the requested iterations (all structures)."""

    z: torch.Tensor
    iterations: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    states: list[torch.Tensor] = field(default_factory=list)


class GraphInnerProduct:
    """Inner products and norms per graph of node tensors ``[N, D]``."""

    def __init__(self, batch: torch.Tensor, num_graphs: int) -> None:
        self.batch = batch
        self.num_graphs = num_graphs

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[N, D], [N, D] -> [B]``."""
        per_node = (a * b).sum(dim=1)  # [N]
        return per_node.new_zeros(self.num_graphs).index_add(0, self.batch, per_node)

    def norm(self, a: torch.Tensor) -> torch.Tensor:
        return self.dot(a, a).sqrt()

    def to_nodes(self, per_graph: torch.Tensor) -> torch.Tensor:
        """``[B] -> [N, 1]``: one value per graph, to broadcast over its nodes' features."""
        return per_graph[self.batch][:, None]


class FixedPointIteration:
    """``z <- f(z)``."""

    def __init__(self, graphs: GraphInnerProduct) -> None:
        self.graphs = graphs

    def propose(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        return fz


class Anderson:
    """Anderson acceleration (type II) with mixing coefficients per graph: the next iterate is the
    combination of the last ``memory`` map outputs whose residual combination is smallest, with
    a Tikhonov term relative to the residuals' scale (sqrt of the dtype's epsilon)."""

    def __init__(self, graphs: GraphInnerProduct, memory: int = 5) -> None:
        self.graphs = graphs
        self.memory = memory
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def propose(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        self.inputs = [*self.inputs, z][-self.memory :]
        self.outputs = [*self.outputs, fz][-self.memory :]
        outputs = torch.stack(self.outputs)  # [m, N, D]
        # the Gram matrix outside autocast (in bfloat16 it is singular), its small solve in float64
        with torch.autocast(z.device.type, enabled=False):
            residuals = outputs - torch.stack(self.inputs)  # [m, N, D]
            per_node = torch.einsum("ind,jnd->nij", residuals, residuals).double()  # [N, m, m]
            gram = per_node.new_zeros(self.graphs.num_graphs, *per_node.shape[1:])
            gram = gram.index_add(0, self.graphs.batch, per_node)  # [B, m, m]
            m = gram.shape[1]
            scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1)  # [B]
            ridge = torch.finfo(outputs.dtype).eps ** 0.5 * scale + 1e-30
            identity = torch.eye(m, dtype=gram.dtype, device=gram.device)
            weights = torch.linalg.solve(gram + ridge[:, None, None] * identity, gram.new_ones(len(gram), m))
            alpha = weights / weights.sum(dim=1, keepdim=True)  # [B, m], sums to 1 per graph
        return torch.einsum("nm,mnd->nd", alpha[self.graphs.batch].to(outputs.dtype), outputs)


class Broyden:
    """Broyden's ("good") method on ``g(z) = f(z) - z`` with a low-rank inverse Jacobian
    ``B = -I + sum_i u_i v_i^T`` kept per graph (its inner products are per graph), no line
    search; the oldest of ``memory`` updates is replaced first."""

    def __init__(self, graphs: GraphInnerProduct, memory: int = 30) -> None:
        self.graphs = graphs
        self.memory = memory
        self.us: list[torch.Tensor] = []
        self.vs: list[torch.Tensor] = []
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def _apply(self, x: torch.Tensor, left: list[torch.Tensor], right: list[torch.Tensor]) -> torch.Tensor:
        """``-x + sum_i left_i <right_i, x>`` per graph: ``B x`` or, swapped, ``B^T x``."""
        out = -x
        for a, b in zip(left, right):
            out = out + a * self.graphs.to_nodes(self.graphs.dot(b, x))
        return out

    def propose(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        g = fz - z
        if self.previous is not None:
            z_prev, g_prev = self.previous
            step, change = z - z_prev, g - g_prev  # s, y
            b_change = self._apply(change, self.us, self.vs)  # B y
            b_transpose_step = self._apply(step, self.vs, self.us)  # B^T s
            denominator = self.graphs.dot(b_transpose_step, change)  # [B]
            usable = denominator.abs() > torch.finfo(g.dtype).tiny ** 0.5
            safe = torch.where(usable, denominator, torch.ones_like(denominator))
            inverse = torch.where(usable, 1 / safe, torch.zeros_like(safe))  # no update where s^T B y ~ 0
            u = (step - b_change) * self.graphs.to_nodes(inverse)
            self.us = [*self.us, u][-self.memory :]
            self.vs = [*self.vs, b_transpose_step][-self.memory :]
        self.previous = (z, g)
        return z - self._apply(g, self.us, self.vs)


SOLVERS = {"anderson": Anderson, "broyden": Broyden, "fixed_point": FixedPointIteration}


def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    batch: torch.Tensor,
    num_graphs: int,
    settings: SolverSettings,
    method: str = "anderson",
    structure_ids: Sequence | None = None,
    record: Collection[int] = (),
    track_grad: bool = False,
) -> SolverResult:
    """Solve ``z = f(z)`` for every structure of the batch, starting from ``z0`` ``[N, ...]``.

    ``record``: iteration numbers (1 = ``z0``) whose iterates are returned in ``states``.
    ``track_grad``: keep the autograd graph through every iteration (unrolled back-propagation);
    by default the solve runs under ``no_grad``. Non-converged structures are named in the
    warning by ``structure_ids`` (e.g. the batch's ``sid``), else by their index in the batch."""
    if method not in SOLVERS:
        raise ValueError(f"unknown fixed-point solver {method!r}; choose from {sorted(SOLVERS)}")
    shape, num_nodes = z0.shape, z0.shape[0]
    graphs = GraphInnerProduct(batch, num_graphs)
    stepper = SOLVERS[method](graphs)

    def flat_map(z: torch.Tensor) -> torch.Tensor:
        return f(z.view(shape)).reshape(num_nodes, -1)

    with nullcontext() if track_grad else torch.no_grad():
        z = z0.reshape(num_nodes, -1)
        best_z = z
        best_abs = z.new_full((num_graphs,), float("inf"))
        best_rel = best_abs.clone()
        active = torch.ones(num_graphs, dtype=torch.bool, device=z.device)
        converged = torch.zeros_like(active)
        iterations = torch.zeros(num_graphs, dtype=torch.long, device=z.device)
        states = []
        for iteration in range(1, settings.max_iter + 1):
            if iteration in record:
                states.append(z.view(shape))
            fz = flat_map(z)
            abs_residual = graphs.norm((fz - z).detach())  # [B]
            output_norm = graphs.norm(fz.detach())
            finite = torch.isfinite(abs_residual) & torch.isfinite(output_norm)
            abs_residual = torch.where(finite, abs_residual, torch.full_like(abs_residual, float("inf")))
            improved = active & (abs_residual < best_abs)
            best_z = torch.where(graphs.to_nodes(improved), z, best_z)
            best_abs = torch.where(improved, abs_residual, best_abs)
            best_rel = torch.where(improved, abs_residual / output_norm.clamp_min(1e-300), best_rel)
            now_converged = active & (abs_residual <= settings.abs_tol + settings.rel_tol * output_norm)
            iterations = torch.where(active, iteration, iterations)
            converged |= now_converged
            active = active & ~now_converged & finite
            if not active.any():
                break
            if iteration < settings.max_iter:
                z = torch.where(graphs.to_nodes(active), stepper.propose(z, fz), best_z)

    if not converged.all():
        failed = (~converged).nonzero().flatten().tolist()
        names = [structure_ids[i] for i in failed] if structure_ids is not None else failed
        residuals = ", ".join(f"{r:.3g}" for r in best_rel[failed].tolist())
        warnings.warn(
            f"{method} fixed-point solve did not converge for {len(failed)} of {num_graphs} structures "
            f"(ids {names}) within {settings.max_iter} iterations (abs_tol={settings.abs_tol}, "
            f"rel_tol={settings.rel_tol}); relative residuals of their best iterates: [{residuals}]; "
            "using the best iterates",
            DEQConvergenceWarning,
            stacklevel=2,
        )
    return SolverResult(best_z.view(shape), iterations, best_abs, best_rel, converged, states)
