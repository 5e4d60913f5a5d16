"""Deep-equilibrium Equiformers: fixed-point solvers, gradients through fixed points, stabilisers
and the DEQ model built on the plugin's EquiformerV2."""

from .gradients import GRADIENTS, implicit_gradient, phantom_gradient
from .model import DEQEquiformerV2
from .solvers import SOLVERS, DEQConvergenceWarning, SolverResult, SolverSettings, solve
from .stabilisers import WeightNorm, apply_weight_norm, fixed_point_correction_loss, jacobian_penalty

__all__ = [
    "DEQConvergenceWarning",
    "DEQEquiformerV2",
    "GRADIENTS",
    "SOLVERS",
    "SolverResult",
    "SolverSettings",
    "WeightNorm",
    "apply_weight_norm",
    "fixed_point_correction_loss",
    "implicit_gradient",
    "jacobian_penalty",
    "phantom_gradient",
    "solve",
]
