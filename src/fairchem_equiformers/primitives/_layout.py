"""Index tables for spherical-harmonic coefficients.

Two orderings are used throughout the package:

* **node layout** (l-major, full): coefficient ``k = l*l + l + m`` for ``l = 0..lmax``,
  ``m = -l..l``; ``K = (lmax+1)**2`` coefficients. Node features are ``[N, K, C]``.
* **edge layout** (m-major, truncated at ``mmax``): what the SO(2) convolution works on once a
  feature has been rotated into an edge's frame. Order: ``m = 0`` for ``l = 0..lmax``, then for
  each ``m = 1..mmax`` the ``+m`` coefficients for ``l = m..lmax`` followed by the ``-m`` ones.
  ``K_e`` coefficients; edge features are ``[E, K_e, C]``. This is the order of the released
  EquiformerV2 SO(2) weights, so checkpoints carry over.
"""

from __future__ import annotations

import math

import torch

from ._wigner import prepare_constants


class SphericalLayout:
    """Coefficient bookkeeping for degree ``lmax`` truncated at order ``mmax``."""

    def __init__(self, lmax: int, mmax: int) -> None:
        if lmax < 0 or not 0 <= mmax <= lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        self.lmax = lmax
        self.mmax = mmax
        # plain attributes (read in every forward, also under torch.compile): the number of degrees
        # carrying order m (m = 0..mmax), and the rows of each order's group in the edge layout
        # (lmax + 1 for m = 0, then 2 * (lmax - m + 1): +m and -m)
        self.order_sizes = [lmax - m + 1 for m in range(mmax + 1)]
        self.order_rows = [self.order_sizes[0]] + [2 * d for d in self.order_sizes[1:]]
        self.edge_lm = self._edge_lm()  # (l, m) of every coefficient of the edge layout, in order
        self.edge_from_degree_blocks = self._edge_from_degree_blocks()
        self.degree_of_node_coefficient = [l for l in range(lmax + 1) for _ in range(2 * l + 1)]  # [K]
        # what every EdgeRotation needs, as tensors (torch.compile reads them as constants): the
        # edge-layout columns of the per-degree blocks and each node row's truncation rescale
        self.edge_columns = torch.tensor(self.edge_from_degree_blocks)  # [K_e]
        self.node_rescale = torch.tensor(
            [self.truncation_rescale(l) for l in self.degree_of_node_coefficient], dtype=torch.float64
        )  # [K]
        prepare_constants(lmax)  # the Wigner constants of these degrees, built before any tracing

    @property
    def num_coefficients(self) -> int:
        """K: coefficients of the node layout."""
        return (self.lmax + 1) ** 2

    def _edge_lm(self) -> list[tuple[int, int]]:
        lm = [(l, 0) for l in range(self.lmax + 1)]
        for m in range(1, self.mmax + 1):
            lm += [(l, m) for l in range(m, self.lmax + 1)]
            lm += [(l, -m) for l in range(m, self.lmax + 1)]
        return lm

    @property
    def num_edge_coefficients(self) -> int:
        """K_e: coefficients of the edge layout."""
        return len(self.edge_lm)

    def degree_orders(self, l: int) -> list[int]:
        """Orders m kept for degree l in the edge layout, ascending."""
        mm = min(l, self.mmax)
        return list(range(-mm, mm + 1))

    def _edge_from_degree_blocks(self) -> list[int]:
        """Permutation taking the concatenation of per-degree truncated blocks (l ascending,
        m ascending within a degree) to the edge layout: ``edge = blocks[:, perm]``."""
        block_pos = {}
        for l in range(self.lmax + 1):
            for m in self.degree_orders(l):
                block_pos[(l, m)] = len(block_pos)
        return [block_pos[lm] for lm in self.edge_lm]

    def edge_index_of(self, l: int, m: int) -> int:
        return self.edge_lm.index((l, m))

    def degree_edge_rows(self, l: int) -> list[int]:
        """Edge-layout rows of degree ``l``, in edge-layout order: ``m = 0``, then ``+m, -m``
        for ``m = 1..min(l, mmax)``."""
        return [k for k, (degree, _) in enumerate(self.edge_lm) if degree == l]

    def truncation_rescale(self, l: int) -> float:
        """Factor sqrt((2l+1)/(2mmax+1)) applied to degrees that lose orders |m| > mmax.

        Rotating back from a truncated edge frame only sees ``2*mmax+1`` of the ``2l+1``
        orders; the released EquiformerV2 compensates the lost variance with this factor."""
        if l <= self.mmax or self.lmax == self.mmax:
            return 1.0
        return math.sqrt((2 * l + 1) / (2 * self.mmax + 1))

    def __repr__(self) -> str:
        return f"SphericalLayout(lmax={self.lmax}, mmax={self.mmax})"
