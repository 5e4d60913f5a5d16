"""Rotation of node features into and out of each edge's frame, degree by degree."""

from __future__ import annotations

import torch

from .layout import SphericalLayout
from .wigner import edge_frame_angles, frame_angles_from_matrices, wigner_d_columns, with_pole_gradients


class EdgeRotation:
    """Per-edge Wigner blocks, computed once per forward pass and shared by every layer.

    Each degree ``l`` keeps a ``[E, 2l+1, r_l]`` block (``r_l = 2*min(l, mmax)+1``): the columns
    of ``D_l`` that survive the ``mmax`` truncation. Rotating in uses its transpose, rotating
    out uses it pre-multiplied by the truncation rescale. No dense ``[K_e, K]`` matrix and no
    permutation matmul is ever formed.

    Build it with :meth:`from_edge_vectors` (the deterministic frame) or
    :meth:`from_rotation_matrices` (any frame, e.g. another implementation's).
    """

    def __init__(
        self, layout: SphericalLayout, *angles: torch.Tensor, edge_vec: torch.Tensor | None = None
    ) -> None:
        """``angles``: cos/sin of the Euler angles alpha, beta (and optionally gamma) of the
        rotation taking ``+y`` to each edge direction, each ``[E]``. ``edge_vec [E, 3]``: the
        vectors the angles came from, to give edges along +-y their gradient (see
        :func:`with_pole_gradients`)."""
        self.layout = layout
        self.blocks = wigner_d_columns(*angles[:4], layout.lmax, layout.mmax, *angles[4:])
        if edge_vec is not None:
            self.blocks = with_pole_gradients(self.blocks, edge_vec)
        self.blocks_out = [
            block * layout.truncation_rescale(l) if layout.truncation_rescale(l) != 1.0 else block
            for l, block in enumerate(self.blocks)
        ]
        self._degree_sizes = [2 * l + 1 for l in range(layout.lmax + 1)]
        self._block_widths = [block.shape[2] for block in self.blocks]
        m0 = [layout.degree_orders(l).index(0) for l in range(layout.lmax + 1)]
        self._m0_columns = [block[:, :, i] for block, i in zip(self.blocks_out, m0)]

    @classmethod
    def from_edge_vectors(cls, edge_vec: torch.Tensor, layout: SphericalLayout) -> EdgeRotation:
        """Frame fixed by the edge vectors ``[E, 3]`` alone (source minus target, non-zero)."""
        return cls(layout, *edge_frame_angles(edge_vec), edge_vec=edge_vec)

    @classmethod
    def from_rotation_matrices(cls, rotation: torch.Tensor, layout: SphericalLayout) -> EdgeRotation:
        """Frame given as rotations ``[E, 3, 3]`` that map each edge direction onto ``+y``."""
        return cls(layout, *frame_angles_from_matrices(rotation))

    # Reordering goes through ``split`` and ``cat`` of views: their backward passes are a
    # ``cat`` and views, where slicing or ``index_select`` would zero-fill a full-size gradient.

    def to_edge(self, x: torch.Tensor) -> torch.Tensor:
        """``[E, K, C]`` node layout (already gathered per edge) -> ``[E, K_e, C]`` edge layout."""
        degrees = x.split(self._degree_sizes, dim=1)  # [E, 2l+1, C] each
        rows = list(degrees[0].split(1, dim=1))
        for block, x_l in zip(self.blocks[1:], degrees[1:]):
            rows += (block.transpose(1, 2) @ x_l).split(1, dim=1)  # r_l rows [E, 1, C]
        return torch.cat([rows[i] for i in self.layout.edge_from_degree_blocks], dim=1)

    def from_edge(self, y: torch.Tensor) -> torch.Tensor:
        """``[E, K_e, C]`` edge layout -> ``[E, K, C]`` node layout (with truncation rescale)."""
        rows = y.split(1, dim=1)
        rows = [rows[i] for i in self.layout.degree_blocks_from_edge]  # degree-block order
        parts, start = [rows[0]], 1
        for block, width in zip(self.blocks_out[1:], self._block_widths[1:]):
            y_l = torch.cat(rows[start : start + width], dim=1)  # [E, r_l, C]
            parts.append(block @ y_l)  # [E, 2l+1, C]
            start += width
        return torch.cat(parts, dim=1)

    def from_edge_m0(self, y_m0: torch.Tensor) -> torch.Tensor:
        """Only ``m = 0`` components ``[E, lmax+1, C]`` -> ``[E, K, C]`` node layout."""
        degrees = y_m0.split(1, dim=1)  # [E, 1, C] each
        parts = [degrees[0]]
        for column, y_l in zip(self._m0_columns[1:], degrees[1:]):
            parts.append(column[:, :, None] * y_l)  # [E, 2l+1, C]
        return torch.cat(parts, dim=1)
