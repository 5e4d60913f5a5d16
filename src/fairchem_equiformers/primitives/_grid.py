"""Point values of spherical-harmonic expansions on an S2 grid, and back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from e3nn import o3

from ._layout import SphericalLayout


def default_grid_resolution(lmax: int, mmax: int) -> tuple[int, int]:
    """(latitude, longitude) points when no resolution is given (the released default)."""
    longitude = 2 * (mmax + 1) + 1 if lmax == mmax else 2 * mmax + 1
    return 2 * (lmax + 1), longitude


class S2Grid(torch.nn.Module):
    """Matrices between coefficients and ``G`` grid points (e3nn's grid, component norm).

    ``edge_layout=True`` uses the truncated m-major edge layout (``K_e`` coefficients, degrees
    above ``mmax`` rescaled as in the released model); otherwise the full node layout (``K``).

    Shapes: ``to_grid: [..., K', C] -> [..., G, C]``; ``from_grid`` the reverse.
    """

    def __init__(
        self, layout: SphericalLayout, resolution: int | Sequence[int] | None, edge_layout: bool
    ) -> None:
        """``resolution``: points in latitude and longitude (one number: the same for both, a
        pair: ``[latitude, longitude]``, EquiformerV3's ``*_grid_resolution_list``)."""
        super().__init__()
        lmax, mmax = layout.lmax, layout.mmax
        if resolution is None:
            res = default_grid_resolution(lmax, mmax)
        elif isinstance(resolution, int):
            res = (resolution, resolution)
        else:
            res = tuple(int(r) for r in resolution)
            if len(res) != 2:
                raise ValueError(f"grid resolution {list(resolution)}: give [latitude, longitude] points")
        to_grid = o3.ToS2Grid(lmax, res, normalization="component", dtype=torch.float64)
        from_grid = o3.FromS2Grid(res, lmax, normalization="component", dtype=torch.float64)
        # [lat, long, K] -> [G, K]
        to_mat = torch.einsum("mbi,am->bai", to_grid.shb, to_grid.sha).reshape(-1, lmax**2 + 2 * lmax + 1)
        from_mat = torch.einsum("am,mbi->bai", from_grid.sha, from_grid.shb).reshape(to_mat.shape)
        if edge_layout:
            columns = [l * l + l + m for l, m in layout.edge_lm]
            scale = torch.tensor(
                [layout.truncation_rescale(l) for l, _ in layout.edge_lm], dtype=torch.float64
            )
            to_mat, from_mat = to_mat[:, columns] * scale, from_mat[:, columns] * scale
        self.register_buffer("to_grid_matrix", to_mat.contiguous(), persistent=False)
        self.register_buffer("from_grid_matrix", from_mat.contiguous(), persistent=False)
        self.resolution = res

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_grid_matrix.to(x.dtype) @ x

    def from_grid(self, x_grid: torch.Tensor) -> torch.Tensor:
        return self.from_grid_matrix.to(x_grid.dtype).T @ x_grid

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, coefficients={self.to_grid_matrix.shape[1]}"
