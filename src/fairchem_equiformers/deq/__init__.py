"""Deep-equilibrium models over any backbone of the package: fixed-point solvers, gradients
through fixed points, stabilisers, ``DEQBackbone`` / ``DEQ`` and the flat-keyed
``DEQEquiformerV2`` / ``DEQEquiformerV1``."""

from .gradients import GRADIENTS, implicit_gradient, phantom_gradient
from .model import DEQ, DEQBackbone, DEQEquiformerV1, DEQEquiformerV2
from .solvers import SOLVERS, DEQConvergenceWarning, SolverResult, SolverSettings, solve
from .stabilisers import (
    IrrepsWeightNorm,
    WeightNorm,
    apply_weight_norm,
    fixed_point_correction_loss,
    jacobian_penalty,
)

__all__ = [
    "DEQ",
    "DEQBackbone",
    "DEQConvergenceWarning",
    "DEQEquiformerV1",
    "DEQEquiformerV2",
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
