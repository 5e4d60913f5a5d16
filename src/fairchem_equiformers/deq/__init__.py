"""Deep-equilibrium Equiformers: fixed-point solvers, gradients through fixed points, stabilisers
and the DEQ models built on the plugin's EquiformerV2 and Equiformer (V1)."""

from .gradients import GRADIENTS, implicit_gradient, phantom_gradient
from .model import DEQEquiformerV2, DEQMixin
from .model_v1 import DEQEquiformerV1
from .solvers import SOLVERS, DEQConvergenceWarning, SolverResult, SolverSettings, solve
from .stabilisers import (
    IrrepsWeightNorm,
    WeightNorm,
    apply_weight_norm,
    fixed_point_correction_loss,
    jacobian_penalty,
)

__all__ = [
    "DEQConvergenceWarning",
    "DEQEquiformerV1",
    "DEQEquiformerV2",
    "DEQMixin",
    "GRADIENTS",
    "IrrepsWeightNorm",
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
