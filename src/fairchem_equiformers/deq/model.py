"""Deep-equilibrium EquiformerV2 (after "Scaling force fields with equivariant deep equilibrium
models", Burger et al., arXiv:2509.08734).

encode (EquiformerV2's atom and edge-degree embeddings: the injection ``u``) -> fixed point
``z* = f(z*, u)`` -> decode (EquiformerV2's final norm, energy head and force head, direct or
``-dE/dpos``). The map adds the normalised injection to the state, runs ``num_layers``
EquiformerV2 transformer blocks and normalises the result:

    f(z, u) = norm_fp(blocks(z + norm_u(u))),   z_0 = 0 (or the previous frame's fixed point)

Normalisation choices (the reference offers several; these are fixed here): the injection is
normalised once (``norm_u``) and the map's output too (``norm_fp``), both ``layer_norm_sh`` (scalars
and ``l > 0`` each brought to unit scale, learnable affine weights) whatever ``norm_type`` the
blocks use. With injection and state on the same scale the map contracts from initialisation
(about 0.6 per plain iteration on the test models); without ``norm_u`` the small embeddings
make it about 0.95, and with ``rms_norm_sh`` on the injection its ``l > 0`` part is too small
for the solve to converge. Features that vanish by symmetry (an unrattled CH4) are rescaled by
the norms and converge slowly. Dropout and drop-path are off inside ``f`` (they would change the
map between solver iterations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from fairchem.core.common.registry import registry

from fairchem_equiformers.equiformer_v2 import EquiformerV2
from fairchem_equiformers.equiformer_v2.attention import EdgeContext
from fairchem_equiformers.primitives import equivariant_norm

from .gradients import GRADIENTS, implicit_gradient, phantom_gradient
from .solvers import SOLVERS, SolverResult, SolverSettings, solve
from .stabilisers import apply_weight_norm, fixed_point_correction_loss, jacobian_penalty

TRAIN_SOLVER = {"rel_tol": 1e-3, "max_iter": 24}
REUSE_SOLVER = {"rel_tol": 1e-3, "max_iter": 40}  # training, every structure from a stored fixed point
BACKWARD_SOLVER = {"rel_tol": 1e-6, "max_iter": 40}  # training with gradient="ift"
# inference (eval mode), forward and backward (adjoint) solves unless set: tight enough that the
# returned energy is that of a converged fixed point and the forces are its gradient
PRECISE_MAX_ITER = 100
PRECISE_REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-6}
PRECISE_REL_TOL_OTHER = 1e-3  # float16 / bfloat16


def precise_settings(dtype: torch.dtype, device: torch.device | None = None) -> SolverSettings:
    """The default inference solve for features of ``dtype``: ``rel_tol`` 1e-10 in float64, 1e-6
    in float32, 1e-3 in half precision or under autocast on ``device``; at most
    ``PRECISE_MAX_ITER`` iterations."""
    half = device is not None and torch.is_autocast_enabled(device.type)
    rel_tol = PRECISE_REL_TOL_OTHER if half else PRECISE_REL_TOL.get(dtype, PRECISE_REL_TOL_OTHER)
    return SolverSettings(rel_tol=rel_tol, max_iter=PRECISE_MAX_ITER)


PRECISE_SOLVER = {"rel_tol": PRECISE_REL_TOL[torch.float64], "max_iter": PRECISE_MAX_ITER}


def _settings(name: str, values: dict | None, default: dict, per_call: bool = False) -> SolverSettings | None:
    """``values`` completed by ``default``; ``None`` (chosen per call) when ``per_call`` and unset."""
    if values is None and per_call:
        return None
    values = default if values is None else values
    unknown = set(values) - {"abs_tol", "rel_tol", "max_iter"}
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {sorted(unknown)}; allowed: abs_tol, rel_tol, max_iter")
    return SolverSettings(**{**default, **values})


class DEQMixin:
    """The deep-equilibrium machinery shared by :class:`DEQEquiformerV2` and
    :class:`~fairchem_equiformers.deq.model_v1.DEQEquiformerV1`: argument checks, solver settings,
    the solve with the chosen gradient, fixed-point reuse, stabiliser losses and statistics.

    A model is ``class DEQModel(DEQMixin, Model)``: it lists the dropouts to refuse in
    ``_deq_dropouts``, builds ``injection_norm`` / ``fixed_point_norm`` and calls
    ``_weight_normalise(map_modules)`` in its ``__init__``, and its block loop (``_interact``)
    returns ``self._fixed_point(f, injection, data)`` for its map ``f`` (``z -> f(z)``, any shape
    ``[N, ...]``, the injection already inside ``f``).

    DEQ arguments (keyword, every one with a default):

    * ``solver``: ``"anderson"``, ``"broyden"`` or ``"fixed_point"``;
    * ``solver_train`` / ``solver_eval`` / ``solver_reuse``: ``{abs_tol, rel_tol, max_iter}`` in
      training, in evaluation, and whenever every structure starts from a reused fixed point;
      ``forward(data, solver=SolverSettings(...))`` overrides them for one call. Unset, inference
      (eval mode) solves to ``precise_settings(dtype)`` (``rel_tol`` 1e-10 in float64, 1e-6 in
      float32, at most 100 iterations), reused or not, so the returned energy is that of a
      converged fixed point; training uses ``TRAIN_SOLVER`` (1e-3, 24) and ``REUSE_SOLVER``;
    * ``gradient``: how training differentiates through the fixed point: ``"phantom"``
      (``phantom_steps`` steps, default 1), ``"ift"`` (backward fixed point) or ``"unrolled"``
      (back-propagation through plain fixed-point iterations under the same settings). At
      inference every model uses the implicit gradient (IFT), so ``-dE/dpos`` forces (and any
      gradient taken in eval mode) are the exact gradient of the returned energy;
    * ``solver_backward``: the backward (adjoint) solve of the IFT; unset: ``BACKWARD_SOLVER``
      (1e-6, 40) in training, at inference ``precise_settings(dtype)`` or the forward solve's
      settings, whichever is tighter;
    * ``reuse_fixed_point``: start each structure from the previous call's fixed point of the
      structure at the same place in the batch when its atomic numbers are the same (MD,
      relaxations, ordered datasets); a structure whose atoms differ starts from zero;
      ``reset_fixed_point()`` forgets them;
    * stabilisers: ``weight_norm`` (on the map's linear layers), ``jacobian_weight`` (Hutchinson
      Jacobian penalty at the fixed point), ``fp_correction_weight`` with
      ``fp_correction_states`` (solver states, evenly spaced from ``z_0``). In training their
      weighted sum is ``model.deq_auxiliary_loss`` (to add to the task loss), else ``None``.

    After each forward, ``deq_stats`` holds scalars for logging (mean and max iterations,
    largest residuals, fractions converged and reused) and ``last_solve`` the per-structure
    :class:`SolverResult`. Structures that do not converge (forward or backward solve) are named
    in a ``DEQConvergenceWarning`` and use their best iterate.
    """

    _deq_dropouts: tuple[str, ...] = ()  # the base model's dropout arguments, refused unless 0

    def __init__(
        self,
        *,
        solver: str = "anderson",
        solver_train: dict | None = None,
        solver_eval: dict | None = None,
        solver_reuse: dict | None = None,
        gradient: str = "phantom",
        phantom_steps: int = 1,
        solver_backward: dict | None = None,
        reuse_fixed_point: bool = False,
        weight_norm: bool = False,
        jacobian_weight: float = 0.0,
        fp_correction_weight: float = 0.0,
        fp_correction_states: int = 1,
        **model_args,
    ) -> None:
        name = type(self).__name__
        for dropout in self._deq_dropouts:
            if model_args.pop(dropout, 0.0):
                raise ValueError(
                    f"{dropout} must be 0 in {name}: dropout would change the map between iterations"
                )
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r}; choose from {sorted(SOLVERS)}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient={gradient!r}; choose from {list(GRADIENTS)}")
        if phantom_steps < 1 or (phantom_steps != 1 and gradient != "phantom"):
            raise ValueError(f"phantom_steps={phantom_steps} needs gradient='phantom' and must be >= 1")
        if jacobian_weight < 0 or fp_correction_weight < 0 or fp_correction_states < 1:
            raise ValueError(
                f"jacobian_weight ({jacobian_weight}) and fp_correction_weight ({fp_correction_weight}) "
                f"must be >= 0 and fp_correction_states ({fp_correction_states}) >= 1"
            )
        if jacobian_weight > 0 and gradient == "unrolled":
            raise ValueError("jacobian_weight needs gradient='phantom' or 'ift' (the penalty is taken at z*)")
        super().__init__(**dict.fromkeys(self._deq_dropouts, 0.0), **model_args)
        self.solver = solver
        self.solver_train = _settings("solver_train", solver_train, TRAIN_SOLVER)
        # None: inference uses precise_settings(dtype), training the TRAIN/REUSE/BACKWARD defaults
        self.solver_eval = _settings("solver_eval", solver_eval, PRECISE_SOLVER, per_call=True)
        self.solver_reuse = _settings("solver_reuse", solver_reuse, REUSE_SOLVER, per_call=True)
        self.solver_backward = _settings("solver_backward", solver_backward, PRECISE_SOLVER, per_call=True)
        self.gradient = gradient
        self.phantom_steps = phantom_steps
        self.reuse_fixed_point = reuse_fixed_point
        self.weight_norm = weight_norm
        self.jacobian_weight = jacobian_weight
        self.fp_correction_weight = fp_correction_weight
        self.fp_correction_states = fp_correction_states
        self.weight_normalised: list[str] = []
        self.deq_stats: dict[str, float] = {}
        self.last_solve: SolverResult | None = None
        self.deq_auxiliary_loss: torch.Tensor | None = None
        self._call_solver: SolverSettings | None = None
        self._previous: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def _weight_normalise(self, map_modules) -> None:
        """With ``weight_norm``, weight-normalise the linear layers of the map's modules."""
        self.weight_normalised = apply_weight_norm(map_modules) if self.weight_norm else []

    def forward(self, data, solver: SolverSettings | None = None) -> dict[str, torch.Tensor]:
        self._call_solver = solver
        try:
            return super().forward(data)
        finally:
            self._call_solver = None

    def reset_fixed_point(self) -> None:
        """Forget the stored fixed points: the next call starts from zero."""
        self._previous = None

    def _initial_state(self, injection: torch.Tensor, data) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_0 [N, ...]`` and which structures ``[B]`` start from a stored fixed point."""
        counts = data.natoms.tolist()
        z0 = torch.zeros_like(injection)
        reused = torch.zeros(len(counts), dtype=torch.bool, device=injection.device)
        if not self.reuse_fixed_point or self._previous is None:
            return z0, reused
        previous_numbers, previous_states = self._previous
        numbers = data.atomic_numbers.long().split(counts)
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
        for b, (z_b, previous_z) in enumerate(zip(numbers, previous_states)):
            same = previous_numbers[b].shape == z_b.shape and torch.equal(previous_numbers[b], z_b)
            if same and previous_z.dtype == z0.dtype and previous_z.device == z0.device:
                z0[starts[b] : starts[b + 1]] = previous_z
                reused[b] = True
        return z0, reused

    def _solver_settings(
        self, reused: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> SolverSettings:
        """The forward solve's settings: the call's, else (every structure reused) ``solver_reuse``,
        else ``solver_train`` / ``solver_eval``; unset ones default to ``REUSE_SOLVER`` in training
        and to ``precise_settings(dtype)`` at inference."""
        if self._call_solver is not None:
            return self._call_solver
        if reused.all() and (self.solver_reuse is not None or self.training):
            return self.solver_reuse or _settings("solver_reuse", None, REUSE_SOLVER)
        if self.training:
            return self.solver_train
        return self.solver_eval or precise_settings(dtype, device)

    def _backward_settings(
        self, forward: SolverSettings, dtype: torch.dtype, device: torch.device
    ) -> SolverSettings:
        """The adjoint solve's settings: ``solver_backward``, else ``BACKWARD_SOLVER`` in training and
        at inference ``precise_settings(dtype)`` or the ``forward`` solve's, whichever is tighter."""
        if self.solver_backward is not None:
            return self.solver_backward
        if self.training:
            return _settings("solver_backward", None, BACKWARD_SOLVER)
        precise = precise_settings(dtype, device)
        return SolverSettings(
            abs_tol=min(precise.abs_tol, forward.abs_tol),
            rel_tol=min(precise.rel_tol, forward.rel_tol),
            max_iter=max(precise.max_iter, forward.max_iter),
        )

    def _block_fixed_point(self, injection: torch.Tensor, edges, data) -> torch.Tensor:
        """``z* = fixed_point_norm(blocks(z* + injection_norm(u)))`` for the model's weight-tied
        ``self.blocks`` (each called as ``block(x, edges, batch, num_graphs)``); ``[N, ...]``."""
        injection = self.injection_norm(injection)
        batch, num_graphs = data.batch, len(data.natoms)

        def f(z: torch.Tensor) -> torch.Tensor:
            x = z + injection
            for block in self.blocks:
                x = block(x, edges, batch, num_graphs)
            return self.fixed_point_norm(x)

        return self._fixed_point(f, injection, data)

    def _fixed_point(
        self, f: Callable[[torch.Tensor], torch.Tensor], injection: torch.Tensor, data
    ) -> torch.Tensor:
        """The differentiable fixed point ``z* = f(z*)`` ``[N, ...]`` (``injection``: its shape and
        dtype, for ``z_0``), with the configured solver, gradient, reuse, stabilisers and stats."""
        batch, num_graphs = data.batch, len(data.natoms)
        sid = getattr(data, "sid", None)
        structure_ids = sid.tolist() if torch.is_tensor(sid) else sid
        z0, reused = self._initial_state(injection, data)
        settings = self._solver_settings(reused, z0.dtype, z0.device)
        # inference: always the implicit gradient (the forces are then the gradient of the returned
        # energy); phantom and unrolled are training choices for the parameter gradient
        gradient = self.gradient if self.training else "ift"
        max_iter = settings.max_iter
        record = set()
        correction = self.training and self.fp_correction_weight > 0 and torch.is_grad_enabled()
        if correction:
            record = {
                1 + (i * (max_iter - 1)) // self.fp_correction_states
                for i in range(self.fp_correction_states)
            }
        common = (batch, num_graphs, settings)
        z_in = first = None
        if gradient == "unrolled":
            result = solve(f, z0, *common, "fixed_point", structure_ids, record, track_grad=True)
            z = f(result.z)
        else:
            result = solve(f, z0, *common, self.solver, structure_ids, record)
            # under autocast (--amp) the solve, run without autograd, left half-precision copies
            # of the weights in autocast's cache: the steps below must cast them again, with
            # autograd, or the map's parameters get no gradient
            torch.clear_autocast_cache()
            if gradient == "phantom":
                z_in, first, z = phantom_gradient(f, result.z, self.phantom_steps)
            else:
                backward = self._backward_settings(settings, z0.dtype, z0.device)
                z_in, first = implicit_gradient(
                    f, result.z, batch, num_graphs, backward, self.solver, structure_ids
                )
                z = first

        self.deq_auxiliary_loss = None
        if self.training and torch.is_grad_enabled():
            losses = []
            if self.jacobian_weight > 0:
                losses.append(self.jacobian_weight * jacobian_penalty(first, z_in))
            if correction:
                loss = fixed_point_correction_loss(f, result.states, z, batch, num_graphs)
                losses.append(self.fp_correction_weight * loss)
            self.deq_auxiliary_loss = sum(losses) if losses else None

        if self.reuse_fixed_point:
            self._previous = (
                [n.clone() for n in data.atomic_numbers.long().split(data.natoms.tolist())],
                list(z.detach().split(data.natoms.tolist())),
            )
        self.last_solve = SolverResult(
            result.z.detach(), result.iterations, result.abs_residual, result.rel_residual, result.converged
        )
        self.deq_stats = {
            "iterations": result.iterations.double().mean().item(),
            "max_iterations": result.iterations.max().item(),
            "abs_residual": result.abs_residual.max().item(),
            "rel_residual": result.rel_residual.max().item(),
            "converged_fraction": result.converged.double().mean().item(),
            "reused_fraction": reused.double().mean().item(),
        }
        return z

    def extra_repr(self) -> str:
        names = ("solver_train", "solver_eval", "solver_reuse", "solver_backward")
        settings = {k: asdict(getattr(self, k)) if getattr(self, k) else "default" for k in names}
        return f"solver={self.solver}, gradient={self.gradient}, {settings}"

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last auxiliary loss (it holds an autograd graph)."""
        state = dict(self.__dict__)
        state["deq_auxiliary_loss"] = None
        return state


@registry.register_model("fairchem_equiformers.DEQEquiformerV2")
class DEQEquiformerV2(DEQMixin, EquiformerV2):
    """EquiformerV2 whose transformer blocks are replaced by the fixed point of ``num_layers``
    weight-tied blocks (see the module docstring). Every EquiformerV2 argument is accepted
    (``num_layers`` counts the blocks inside the map) except the dropouts inside it, and every
    DEQ argument of :class:`DEQMixin` (solver, tolerances, gradient, reuse, stabilisers)."""

    _deq_dropouts = ("alpha_drop", "drop_path_rate", "proj_drop")

    def __init__(self, num_layers: int = 2, **args) -> None:
        super().__init__(num_layers=num_layers, **args)
        channels = self.norm.num_channels
        self.injection_norm = equivariant_norm("layer_norm_sh", self.layout.lmax, channels)
        self.fixed_point_norm = equivariant_norm("layer_norm_sh", self.layout.lmax, channels)
        self._weight_normalise(self.blocks)

    def _interact(self, injection: torch.Tensor, edges: EdgeContext, data) -> torch.Tensor:
        """The fixed point of the blocks, ``[N, K, C] -> [N, K, C]``."""
        return self._block_fixed_point(injection, edges, data)
