"""Deep-equilibrium models (after "Scaling force fields with equivariant deep equilibrium
models", Burger et al., arXiv:2509.08734) over any backbone of the package.

A backbone is ``readout(interact(*embed(data)))``. The DEQ keeps ``embed`` (the atom and
edge-degree embeddings: the injection ``u``) and ``readout`` (the family's final norm, and for
Equiformer (V1) its output block), and replaces ``interact`` (the transformer blocks) by its
fixed point: the map adds the normalised injection to the state, runs the blocks once and
normalises the result,

    f(z, u) = norm_fp(interact(z + norm_u(u))),   z_0 = 0 (or the previous frame's fixed point)

``norm_u`` and ``norm_fp`` are the backbone's ``interaction_norm()``: ``layer_norm_sh`` for
EquiformerV2 and E2Former (scalars and ``l > 0`` each brought to unit scale, learnable affine
weights) whatever norm the blocks use, the equivariant layer norm on the node irreps for
Equiformer (V1). With injection and state on the same scale the map contracts from
initialisation (about 0.6 per plain iteration on the test models); without ``norm_u`` the small
embeddings make it about 0.95, and with ``rms_norm_sh`` on the injection its ``l > 0`` part is
too small for the solve to converge. Features that vanish by symmetry (an unrattled CH4) are
rescaled by the norms and converge slowly. Dropout and drop-path are off inside ``f`` (they would
change the map between solver iterations): the backbone's ``DROPOUT_KEYS`` must be 0.

``DEQBackbone`` (``backbone:`` a family backbone) returns the backbone's embeddings, for
fairchem's ``hydra`` model and any heads; ``DEQ`` (``backbone:`` a family model with its heads,
e.g. ``fairchem_equiformers.EquiformerV2``) returns that model's outputs. ``DEQEquiformerV2`` and
``DEQEquiformerV1`` are ``DEQ`` with those backbones and flat keys.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict

import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad
from fairchem.core.models.base import BackboneInterface
from torch import nn

from .gradients import GRADIENTS, implicit_gradient, phantom_gradient
from .solvers import SOLVERS, SolverResult, SolverSettings, solve
from .stabilisers import apply_weight_norm, fixed_point_correction_loss, jacobian_penalty

TRAIN_SOLVER = {"rel_tol": 1e-3, "max_iter": 24}
REUSE_SOLVER = {"rel_tol": 1e-3, "max_iter": 40}  # training, every structure from a stored fixed point
BACKWARD_SOLVER = {"rel_tol": 1e-4, "max_iter": 40}  # training: the forward solve is only 1e-3
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


DEQ_KEYS = (
    "solver", "solver_train", "solver_eval", "solver_reuse", "gradient", "phantom_steps",
    "solver_backward", "reuse_fixed_point", "weight_norm", "jacobian_weight", "fp_correction_weight",
    "fp_correction_states",
)  # fmt: skip


@registry.register_model("fairchem_equiformers.DEQBackbone")
class DEQBackbone(nn.Module, BackboneInterface):
    """The fixed point of a backbone's blocks (see the module docstring).

    ``backbone``: the wrapped model's section, ``{model: <registered name>, <its keys>}``; any
    backbone (or composite model) of the package that implements ``embed`` / ``interact`` /
    ``readout``, ``interaction_norm()``, ``interaction_blocks`` and ``DROPOUT_KEYS``. Its
    attributes (``regress_forces``, ``direct_forces``, sizes) read through this object, so every
    head of its family builds on a ``DEQBackbone`` as on the backbone itself.

    DEQ keys (every one with a default):

    * ``solver``: ``"anderson"``, ``"broyden"`` or ``"fixed_point"``;
    * ``solver_train`` / ``solver_eval`` / ``solver_reuse``: ``{abs_tol, rel_tol, max_iter}`` in
      training, in evaluation, and whenever every structure starts from a reused fixed point;
      ``forward(data, solver=SolverSettings(...))`` overrides them for one call. Unset, inference
      (eval mode) solves to ``precise_settings(dtype)`` (``rel_tol`` 1e-10 in float64, 1e-6 in
      float32, at most 100 iterations), reused or not, so the returned energy is that of a
      converged fixed point; training uses ``TRAIN_SOLVER`` (1e-3, 24) and ``REUSE_SOLVER``;
    * ``gradient``: how training differentiates through the fixed point: ``"ift"`` (default:
      backward fixed point), ``"phantom"`` (``phantom_steps`` steps, default 1) or ``"unrolled"``
      (back-propagation through plain fixed-point iterations under the same settings). At
      inference every model uses the implicit gradient (IFT), so ``-dE/dpos`` forces (and any
      gradient taken in eval mode) are the exact gradient of the returned energy. With forces
      from ``-dE/dpos`` the training forces are differentiated the same way, so a phantom model
      fits the forces' phantom approximation, not the forces it returns at inference (a
      ``UserWarning`` says so; measured in ``docs/deq.md``); with direct forces the phantom
      gradient only approximates the parameter gradient, as in the reference DEQ recipes;
    * ``solver_backward``: the backward (adjoint) solve of the IFT; unset: ``BACKWARD_SOLVER``
      (1e-4, 40) in training, at inference ``precise_settings(dtype)`` or the forward solve's
      settings, whichever is tighter;
    * ``reuse_fixed_point``: start each structure from the previous call's fixed point of the
      structure at the same place in the batch when its atomic numbers are the same (MD,
      relaxations, ordered datasets); a structure whose atoms differ starts from zero;
      ``reset_fixed_point()`` forgets them;
    * stabilisers: ``weight_norm`` (on the linear layers of the backbone's ``interaction_blocks``),
      ``jacobian_weight`` (Hutchinson Jacobian penalty at the fixed point), ``fp_correction_weight``
      with ``fp_correction_states`` (solver states, evenly spaced from ``z_0``).

    The trainer reads two declared attributes after each training forward: ``deq_auxiliary_loss``
    (the stabilisers' weighted sum, to add to the task loss; ``None`` outside training or without
    stabilisers) and ``deq_stats`` (scalars for logging: mean and max iterations, largest
    residuals, fractions converged and reused). ``last_solve`` holds the per-structure
    :class:`SolverResult`. Structures that do not converge (forward or backward solve) are named
    in a ``DEQConvergenceWarning`` and use their best iterate.
    """

    def __init__(
        self,
        backbone: dict,
        solver: str = "anderson",
        solver_train: dict | None = None,
        solver_eval: dict | None = None,
        solver_reuse: dict | None = None,
        gradient: str = "ift",
        phantom_steps: int = 1,
        solver_backward: dict | None = None,
        reuse_fixed_point: bool = False,
        weight_norm: bool = False,
        jacobian_weight: float = 0.0,
        fp_correction_weight: float = 0.0,
        fp_correction_states: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, dict) or "model" not in backbone:
            raise ValueError(
                f"backbone={backbone!r} must be a section naming the wrapped model, e.g. "
                "{model: fairchem_equiformers.EquiformerV2, num_layers: 2, ...}"
            )
        config = dict(backbone)
        backbone_class = registry.get_model_class(config.pop("model"))
        for key in ("embed", "interact", "readout", "interaction_norm", "DROPOUT_KEYS"):
            if not hasattr(backbone_class, key):
                raise ValueError(f"{backbone_class.__name__} cannot be wrapped by a DEQ: it has no {key}")
        if config.get("precision", "fp32") != "fp32":
            raise ValueError(
                f"precision={config['precision']!r}: a DEQ's fixed-point solve runs in float32 "
                "(in bf16 it needs several times the iterations)"
            )
        for dropout in backbone_class.DROPOUT_KEYS:
            if config.pop(dropout, 0.0):
                raise ValueError(
                    f"{dropout} must be 0 in {type(self).__name__}: dropout would change the map "
                    "between iterations"
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
        self.backbone = backbone_class(**config, **dict.fromkeys(backbone_class.DROPOUT_KEYS, 0.0))
        if gradient == "phantom" and self.backbone.regress_forces and not self.backbone.direct_forces:
            warnings.warn(
                f"{type(self).__name__}: gradient='phantom' with forces from -dE/dpos: training fits "
                "the phantom approximation of the forces, inference returns the energy's exact "
                "gradient, and the two differ (ethanol, 300 steps: held-out force MAE 0.087 eV/A in "
                "training mode, 0.632 at inference; gradient='ift' 0.076 in both); use gradient: ift "
                "(the default) or unrolled",
                UserWarning,
                stacklevel=2,
            )
        self.injection_norm = self.backbone.interaction_norm()
        self.fixed_point_norm = self.backbone.interaction_norm()
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
        map_blocks = nn.ModuleList(list(self.backbone.interaction_blocks))
        self.weight_normalised: list[str] = apply_weight_norm(map_blocks) if weight_norm else []
        self.deq_stats: dict[str, float] = {}
        self.last_solve: SolverResult | None = None
        self.deq_auxiliary_loss: torch.Tensor | None = None
        self._call_solver: SolverSettings | None = None
        self._previous: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def __getattr__(self, name: str):
        """Parameters and modules as usual, then the wrapped backbone's attributes."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "backbone" or "backbone" not in modules:
                raise
            return getattr(modules["backbone"], name)

    @property
    def regress_forces(self) -> bool:
        return self.backbone.regress_forces

    @regress_forces.setter
    def regress_forces(self, value: bool) -> None:
        self.backbone.regress_forces = value

    @property
    def direct_forces(self) -> bool:
        return self.backbone.direct_forces

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @conditional_grad(torch.enable_grad())
    def forward(self, data, solver: SolverSettings | None = None) -> dict[str, torch.Tensor]:
        """The backbone's embeddings at the fixed point (``solver``: settings for this call)."""
        self._call_solver = solver
        try:
            injection, state = self.backbone.embed(data)
            return self.backbone.readout(self._block_fixed_point(injection, state, data), state, data)
        finally:
            self._call_solver = None

    def reset_fixed_point(self) -> None:
        """Forget the stored fixed points: the next call starts from zero."""
        self._previous = None

    def no_weight_decay(self) -> set[str]:
        """The wrapped model's rule (under ``backbone.``), the two norms, and the weight-norm
        scales (per-row gains, exempt like a norm's affine weights; the directions are decayed
        as the weights they replace)."""
        exempt = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
        for name, _ in self.named_parameters():
            if name.startswith(("injection_norm.", "fixed_point_norm.")) or name.endswith(".scale"):
                exempt.add(name)
        return exempt

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

    def _block_fixed_point(self, injection: torch.Tensor, state, data) -> torch.Tensor:
        """``z* = fixed_point_norm(interact(z* + injection_norm(u)))`` ``[N, ...]``."""
        injection = self.injection_norm(injection)

        def f(z: torch.Tensor) -> torch.Tensor:
            return self.fixed_point_norm(self.backbone.interact(z + injection, state, data))

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


@registry.register_model("fairchem_equiformers.DEQ")
class DEQ(DEQBackbone):
    """A DEQ model: ``backbone`` names a family model with its heads (e.g.
    ``{model: fairchem_equiformers.EquiformerV2, num_layers: 2, direct_forces: false, ...}``),
    whose blocks become the fixed point's map and whose heads read the fixed point. ``forward``
    returns that model's outputs (energy, forces, stress). Keys: see ``DEQBackbone``."""

    @conditional_grad(torch.enable_grad())
    def forward(self, data, solver: SolverSettings | None = None) -> dict[str, torch.Tensor]:
        return self.backbone.predict(data, super().forward(data, solver))


def _split_keys(keys: dict) -> tuple[dict, dict]:
    """(DEQ keys, the wrapped model's keys)."""
    return {k: v for k, v in keys.items() if k in DEQ_KEYS}, {
        k: v for k, v in keys.items() if k not in DEQ_KEYS
    }


def _flat_layout(model: nn.Module, rename: Callable[[str], str]) -> None:
    """Accept state dicts of the flat layout these models had (the wrapped model's keys at the
    top level, beside ``injection_norm`` / ``fixed_point_norm``): ``rename`` maps such a key
    (without the module's prefix) to this layout's."""

    def hook(state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            local = key[len(prefix) :]
            if local.startswith(("backbone.", "injection_norm.", "fixed_point_norm.")):
                continue
            state_dict[prefix + rename(local)] = state_dict.pop(key)

    model._register_load_state_dict_pre_hook(hook)


@registry.register_model("fairchem_equiformers.DEQEquiformerV2")
class DEQEquiformerV2(DEQ):
    """``DEQ`` over EquiformerV2 with flat keys: every EquiformerV2 key (``num_layers`` counts the
    blocks inside the map, default 2) except its dropouts, and every DEQ key.

    ``use_gate_act`` is ``True`` by default (EquiformerV2's is ``False``): the fixed point
    amplifies the S2 grid's equivariance error (defaults, float64, rattled Cu(111)+O: rotation
    error 3.4e-3 energy and 1.2e-1 forces with the grid, against 1.6e-5 and 7.6e-3 for
    ``EquiformerV2(num_layers=2)``; a 24-point grid still 7.7e-5 / 2.4e-3) while gate
    activations make every operation exactly equivariant (9e-15 / 8e-14) at the same cost
    (``python benchmarks/bench_symmetry.py``)."""

    def __init__(self, num_layers: int = 2, use_gate_act: bool = True, **keys) -> None:
        deq_keys, model_keys = _split_keys(keys)
        model_keys = {
            "model": "fairchem_equiformers.EquiformerV2", "num_layers": num_layers,
            "use_gate_act": use_gate_act, **model_keys,
        }  # fmt: skip
        super().__init__(model_keys, **deq_keys)
        _flat_layout(self, lambda key: "backbone." + key)


@registry.register_model("fairchem_equiformers.DEQEquiformerV1")
class DEQEquiformerV1(DEQ):
    """``DEQ`` over Equiformer (V1) with flat keys: every EquiformerV1 key except its dropouts
    (``num_layers``, default 1, counts the blocks inside the map; the output block, which maps to
    ``irreps_feature``, comes on top: ``DEQEquiformerV1(num_layers=k)`` has the parameters of
    ``EquiformerV1(num_layers=k + 1)`` plus the two norms), and every DEQ key. Gate activations
    only (no S2 grid), so the map is exactly equivariant."""

    def __init__(self, num_layers: int = 1, **keys) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        deq_keys, model_keys = _split_keys(keys)
        model_keys = {
            "model": "fairchem_equiformers.EquiformerV1",
            "num_layers": num_layers + 1,
            **model_keys,
        }
        super().__init__(model_keys, **deq_keys)
        output_block = f"blocks.{num_layers}."

        def rename(key: str) -> str:
            if key.startswith("output_block."):
                key = output_block + key[len("output_block.") :]
            return "backbone." + key

        _flat_layout(self, rename)
