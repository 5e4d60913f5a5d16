"""EquiformerV3's activations, by the names of its configs (``attn_activation``, ``ffn_activation``).

Every activation maps spherical-harmonic features ``x: [B, K', C_in]`` (and, except for the
plain S2 ones, invariant inputs ``scalars: [B, S]``) to ``[B, K', C]``. ``K'`` is the layout of
the grid the activation was built with: the truncated edge layout in the graph attention, the
full node layout in the feed-forward network and the stress head (see ``S2Grid``).

* ``gate``: SiLU of the scalar coefficient, sigmoid gates (from ``scalars``, one per degree
  ``l > 0`` and channel) on the rest; ``S = lmax * C``.
* ``s2``: SiLU on the S2 grid. ``s2_swiglu``: SwiGLU on the grid (``C_in = 2C``: the first
  half, through SiLU, times the second).
* ``sep_*``: separable: the scalar coefficient is replaced by the same function of ``scalars``
  (``S = C_in``); ``sep-merge_*``: added to it instead (the "merge"). ``square`` is the plain
  product of the two halves.
* ``sep-merge_gates2_swiglu``: the grid values' halves multiplied (a self tensor product),
  projected back and gated per channel by ``sigmoid(scalars[C_in:])``; SwiGLU of
  ``scalars[:C_in]`` merged into the scalar coefficient (``C_in = 2C``, ``S = 3C``).
* ``*_mem``: the same function, recomputed in the backward instead of stored (activation
  checkpointing). The official code's ``s2_swiglu_mem`` and ``sep_s2_swiglu_mem`` project the
  activation's input instead of its output back from the grid (a shape error whenever the grid
  has more points than coefficients); here they compute what their names say.

``dropout`` drops where the official ``value_drop`` / ``ffn_drop`` do: after the scalar
function and the gates (``gate``), after the grid function (S2 kinds), after the product of
the grid halves (``gates2``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fairchem_equiformers.primitives import S2Grid, grid_product

ACTIVATIONS = (
    "gate",
    "s2",
    "sep_s2",
    "s2_swiglu",
    "s2_swiglu_mem",
    "sep_s2_swiglu",
    "sep-merge_s2_swiglu",
    "sep_s2_swiglu_mem",
    "sep-merge_s2_swiglu_mem",
    "sep_s2_square",
    "sep-merge_gates2_swiglu",
    "sep-merge_gates2_swiglu_mem",
)


def check_activation(name: str, key: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"{key}={name!r} is not an EquiformerV3 activation; allowed: {list(ACTIVATIONS)}")


def has_scalars(name: str) -> bool:
    """Whether the activation takes invariant inputs besides the features."""
    return name.removesuffix("_mem") not in ("s2", "s2_swiglu")


def halves_channels(name: str) -> bool:
    """Whether the grid function maps ``2C`` channels to ``C`` (SwiGLU, square, gates2)."""
    return "swiglu" in name or "square" in name


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` of the halves ``a, b`` of the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return nn.functional.silu(a) * b


def square(x: torch.Tensor) -> torch.Tensor:
    """``a * b`` of the halves of the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return a * b


def _dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.dropout(x, module.dropout, module.training) if module.dropout else x


class GateV3(nn.Module):
    """``gate``. ``degrees``: the degree of every coefficient of the layout after the first.
    Shapes: ``x: [B, K', C]``, ``scalars: [B, lmax * C]`` -> ``[B, K', C]``."""

    def __init__(self, degrees: list[int], lmax: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.lmax, self.dropout = lmax, dropout
        self.register_buffer("gate_index", torch.tensor([l - 1 for l in degrees]), persistent=False)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        gates = _dropout(
            self, torch.sigmoid(scalars.reshape(x.shape[0], self.lmax, x.shape[2]))
        )  # [B, lmax, C]
        scalar, rest = x.split([1, x.shape[1] - 1], dim=1)
        scalar = _dropout(self, nn.functional.silu(scalar))
        return torch.cat([scalar, rest * gates.index_select(1, self.gate_index)], dim=1)


class GridActivation(nn.Module):
    """``s2``, ``s2_swiglu``, ``sep_*`` and ``sep-merge_*`` (see the module docstring).
    Shapes: ``x: [B, K', C_in]`` (``scalars: [B, C_in]``) -> ``[B, K', C]``."""

    def __init__(self, grid: S2Grid, name: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.grid, self.dropout = grid, dropout
        base = name.removesuffix("_mem")
        self.function = swiglu if "swiglu" in base else square if "square" in base else nn.functional.silu
        self.separable = base.startswith("sep")
        self.merge = base.startswith("sep-merge")
        self.recompute = name.endswith("_mem")

    def _forward(self, x: torch.Tensor, scalars: torch.Tensor | None) -> torch.Tensor:
        to_grid = self.grid.to_grid_matrix.to(x.dtype)  # [G, K']
        from_grid = self.grid.from_grid_matrix.to(x.dtype).T  # [K', G]
        out = from_grid @ _dropout(self, self.function(to_grid @ x))  # [B, K', C]
        if not self.separable:
            return out
        scalars = _dropout(self, self.function(scalars))[:, None, :]  # [B, 1, C]
        first = out[:, :1] + scalars if self.merge else scalars
        return torch.cat([first, out[:, 1:]], dim=1)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, scalars, use_reentrant=False)
        return self._forward(x, scalars)


class GatedGridProduct(nn.Module):
    """``sep-merge_gates2_swiglu``. Shapes: ``x: [B, K', 2C]``, ``scalars: [B, 3C]`` -> ``[B, K', C]``."""

    def __init__(self, grid: S2Grid, name: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.grid, self.dropout = grid, dropout
        self.recompute = name.endswith("_mem")

    def _forward(self, x: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        scalar_in, gates = scalars.split([x.shape[2], scalars.shape[1] - x.shape[2]], dim=1)
        scalar_out = _dropout(self, swiglu(scalar_in))[:, None, :]  # [B, 1, C]
        gates = torch.sigmoid(gates)[:, None, :]  # [B, 1, C]
        a, b = x.chunk(2, dim=-1)  # [B, K', C] each
        if self.dropout and self.training:
            to_grid = self.grid.to_grid_matrix.to(x.dtype)  # [G, K']
            from_grid = self.grid.from_grid_matrix.to(x.dtype).T  # [K', G]
            product = from_grid @ _dropout(self, (to_grid @ a) * (to_grid @ b))
        else:
            product = grid_product(self.grid, a, b)  # chunked: the grid values are never held whole
        out = product * gates  # [B, K', C]
        return torch.cat([out[:, :1] + scalar_out, out[:, 1:]], dim=1)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, scalars, use_reentrant=False)
        return self._forward(x, scalars)


def make_activation(
    name: str, grid: S2Grid, degrees: list[int], lmax: int, dropout: float = 0.0
) -> nn.Module:
    """The activation ``name`` on ``grid``'s layout (``degrees``: of its coefficients after the first)."""
    if name == "gate":
        return GateV3(degrees, lmax, dropout)
    if "gates2" in name:
        return GatedGridProduct(grid, name, dropout)
    return GridActivation(grid, name, dropout)
