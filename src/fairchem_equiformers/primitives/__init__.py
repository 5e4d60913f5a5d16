"""Shared equivariant building blocks used by every model family of the package.

The implementation modules are private (``_wigner.py``, ``_so2.py``, ...); this is the public
face: what the families build on. Shape symbols: N nodes, E edges, B graphs, K = (lmax+1)**2
node-layout coefficients, K_e edge-layout coefficients (truncated at mmax), G grid points,
C channels, H heads.
"""

from ._activation import (
    GateActivation,
    S2Activation,
    SeparableS2Activation,
    SmoothLeakyReLU,
    grid_mlp,
    grid_product,
)
from ._autocast import PRECISIONS, accumulation_dtype, check_precision, precision_scope
from ._blocks import row_blocks
from ._dropout import EquivariantDropout, GraphDropPath
from ._graph import Graph, build_graph, check_common_model_keys, check_structures, radius_graph_nonperiodic
from ._grid import S2Grid
from ._irreps import (
    DepthwiseTensorProduct,
    IrrepsLayerNorm,
    e3nn_eager,
    gate_activation,
    head_index,
    is_even_scalar,
    repeat_heads,
    restore_exact_wigner_3j,
)
from ._layout import SphericalLayout
from ._linear import SO3Linear
from ._neighbors import radius_graph
from ._norm import NORMS, equivariant_norm
from ._radial import BesselBasis, ExpNormalBasis, GaussianBasis, PolynomialEnvelope, RadialMLP
from ._recoupling import SolidHarmonicTensorProduct, solid_harmonics, wigner_6j
from ._rotation import EdgeRotation
from ._so2 import SO2Convolution
from ._softmax import graph_softmax
from ._weight_decay import weight_decay_exempt

__all__ = [
    # spherical layouts, rotations, grids
    "SphericalLayout",
    "EdgeRotation",
    "S2Grid",
    # layers on spherical-harmonic features [N, K, C]
    "SO3Linear",
    "SO2Convolution",
    "NORMS",
    "equivariant_norm",
    "GateActivation",
    "S2Activation",
    "SeparableS2Activation",
    "SmoothLeakyReLU",
    "grid_mlp",
    "grid_product",
    "EquivariantDropout",
    "GraphDropPath",
    # e3nn irreps features (Equiformer V1)
    "IrrepsLayerNorm",
    "DepthwiseTensorProduct",
    "gate_activation",
    "head_index",
    "repeat_heads",
    "is_even_scalar",
    "e3nn_eager",
    "restore_exact_wigner_3j",
    # Wigner-6j recoupling (E2Former)
    "SolidHarmonicTensorProduct",
    "solid_harmonics",
    "wigner_6j",
    # radial bases and envelopes
    "BesselBasis",
    "ExpNormalBasis",
    "GaussianBasis",
    "PolynomialEnvelope",
    "RadialMLP",
    # graphs, attention over edges, input checks
    "Graph",
    "build_graph",
    "radius_graph",
    "radius_graph_nonperiodic",
    "graph_softmax",
    "row_blocks",
    "check_common_model_keys",
    "check_structures",
    # training, mixed precision
    "weight_decay_exempt",
    "PRECISIONS",
    "check_precision",
    "precision_scope",
    "accumulation_dtype",
]
