"""Shared equivariant building blocks used by every model family of the package.

Shape symbols: N nodes, E edges, B graphs, K = (lmax+1)**2 node-layout coefficients,
K_e edge-layout coefficients (truncated at mmax), G grid points, C channels, H heads.
"""

from .activation import GateActivation, S2Activation, SeparableS2Activation, SmoothLeakyReLU, grid_mlp
from .blocks import row_blocks
from .dropout import EquivariantDropout, GraphDropPath
from .graph import Graph, build_graph, check_common_model_keys, check_structures, radius_graph_nonperiodic
from .grid import S2Grid
from .layout import SphericalLayout
from .linear import SO3Linear
from .norm import NORMS, equivariant_norm
from .radial import BesselBasis, ExpNormalBasis, GaussianBasis, PolynomialEnvelope, RadialMLP
from .recoupling import (
    SolidHarmonicTensorProduct,
    addition_coefficients,
    recoupling_coefficients,
    solid_harmonics,
    wigner_6j,
)
from .rotation import EdgeRotation
from .so2 import SO2Convolution
from .softmax import graph_softmax
from .wigner import (
    edge_frame_angles,
    frame_angles_from_matrices,
    rotation_generators,
    swap_matrix,
    wigner_d_columns,
    with_pole_gradients,
)

__all__ = [
    "PolynomialEnvelope",
    "ExpNormalBasis",
    "BesselBasis",
    "NORMS",
    "EdgeRotation",
    "Graph",
    "EquivariantDropout",
    "GateActivation",
    "GaussianBasis",
    "GraphDropPath",
    "RadialMLP",
    "S2Activation",
    "S2Grid",
    "SO2Convolution",
    "SO3Linear",
    "SolidHarmonicTensorProduct",
    "addition_coefficients",
    "recoupling_coefficients",
    "solid_harmonics",
    "wigner_6j",
    "SeparableS2Activation",
    "SmoothLeakyReLU",
    "SphericalLayout",
    "build_graph",
    "check_common_model_keys",
    "check_structures",
    "edge_frame_angles",
    "frame_angles_from_matrices",
    "equivariant_norm",
    "graph_softmax",
    "grid_mlp",
    "radius_graph_nonperiodic",
    "row_blocks",
    "rotation_generators",
    "swap_matrix",
    "wigner_d_columns",
    "with_pole_gradients",
]
