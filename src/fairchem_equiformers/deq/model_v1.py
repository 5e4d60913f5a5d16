"""Deep-equilibrium Equiformer (V1): the DEQ of :mod:`fairchem_equiformers.deq.model` on the
plugin's e3nn-irreps Equiformer.

encode (Equiformer's atom and edge-degree embeddings: the injection ``u [N, D_node]``) -> fixed
point ``z* = f(z*, u)`` of ``num_layers`` weight-tied transformer blocks on ``irreps_node_embedding``
-> decode (Equiformer's own last block, which maps to ``irreps_feature``, applied once to ``z*``,
then its final norm and energy head; forces ``-dE/dpos`` or the direct force head):

    f(z, u) = norm_fp(blocks(z + norm_u(u))),   z_0 = 0 (or the previous frame's fixed point)

``norm_u`` and ``norm_fp`` are Equiformer's equivariant layer norm (``IrrepsLayerNorm``: every
``mul x ir`` block brought to unit scale, learnable affine weights), so injection and state are on
the same scale. ``DEQEquiformerV1(num_layers=k)`` has the parameters of ``EquiformerV1(num_layers=k
+ 1)`` plus the two norms: the first ``k`` blocks are the map, the last one the decoder's. Gate
activations only (no S2 grid), so the map is exactly equivariant. Dropout and drop-path are off
inside ``f`` (they would change the map between solver iterations).
"""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from torch import nn

from fairchem_equiformers.equiformer_v1 import EquiformerV1
from fairchem_equiformers.equiformer_v1.attention import EdgeFeatures
from fairchem_equiformers.primitives.irreps import IrrepsLayerNorm

from .model import DEQMixin


@registry.register_model("fairchem_equiformers.DEQEquiformerV1")
class DEQEquiformerV1(DEQMixin, EquiformerV1):
    """Equiformer (V1) whose transformer blocks, all but the last, are replaced by the fixed point
    of ``num_layers`` weight-tied blocks on the node irreps (see the module docstring). Every
    EquiformerV1 argument is accepted (``num_layers`` counts the blocks inside the map; the output
    block comes on top) except the dropouts inside it, and every DEQ argument of
    :class:`~fairchem_equiformers.deq.model.DEQMixin` (solver, tolerances, gradient, reuse,
    stabilisers; ``weight_norm`` covers the blocks' e3nn ``o3.Linear`` layers and radial MLPs)."""

    _deq_dropouts = ("alpha_drop", "drop_path_rate")

    def __init__(self, num_layers: int = 1, **args) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        super().__init__(num_layers=num_layers + 1, **args)
        self.output_block = self.blocks[-1]  # irreps_node -> irreps_feature, applied once to z*
        self.blocks = nn.ModuleList(list(self.blocks)[:-1])  # the map's blocks, node -> node
        irreps_node = self.blocks[0].norm_1.irreps
        self.injection_norm = IrrepsLayerNorm(irreps_node)
        self.fixed_point_norm = IrrepsLayerNorm(irreps_node)
        self._weight_normalise(self.blocks)

    def _interact(self, injection: torch.Tensor, edges: EdgeFeatures, data) -> torch.Tensor:
        """The fixed point of the blocks ``[N, D_node]``, then the output block ``-> [N, D_feature]``."""
        z = self._block_fixed_point(injection, edges, data)  # [N, D_node]
        return self.output_block(z, edges, data.batch, len(data.natoms))
