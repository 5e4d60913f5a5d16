"""EquiformerV3's feed-forward network on node features (also its direct stress head's body).

``SO3Linear`` in, a non-linearity, ``SO3Linear`` out. With ``use_grid_mlp`` the non-linearity
is an MLP applied pointwise on the S2 grid (the official "grid MLP"; needs an ``s2`` kind of
activation), with a separate scalar MLP for ``sep*`` activations; otherwise it is the
activation itself, its invariants from a linear map of the scalar coefficient. Parameter names
follow the official checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fairchem_equiformers.primitives import S2Grid, SO3Linear, grid_product

from .activations import check_activation, make_activation, square, swiglu


class GatedSwiGLUGridMLP(nn.Module):
    """The parameters of the ``gates2`` grid MLP, ``W2 [(sigmoid(gate(s)) * a) * b]`` with ``a, b``
    the halves of ``W1 x`` at every grid point (computed by ``FeedForwardV3._grid_mlp``)."""

    def __init__(self, in_channels: int, hidden_channels: int, dropout: float) -> None:
        super().__init__()
        self.gating_linear = nn.Linear(in_channels, hidden_channels)
        self.grid_linear_1 = nn.Linear(hidden_channels, 2 * hidden_channels, bias=False)
        self.grid_drop = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        self.grid_linear_2 = nn.Linear(hidden_channels, hidden_channels, bias=False)


class _GLULinear(nn.Module):
    """``Linear(C_in, 2 C_out)`` then SwiGLU or the plain product of the halves
    (the official ``LinearSwiGLU`` / ``LinearSquare``; parameter ``linear``)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool, kind: str) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, 2 * out_channels, bias=bias)
        self.function = swiglu if kind == "swiglu" else square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(self.linear(x))


def _maybe_dropout(dropout: float) -> nn.Module:
    return nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()


class FeedForwardV3(nn.Module):
    """Shapes: ``x: [N, K, C_in]`` -> ``[N, K, C_out]`` (node layout, K = (lmax+1)**2)."""

    def __init__(
        self,
        lmax: int,
        grid: S2Grid,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        activation: str,
        use_grid_mlp: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_activation(activation, "ffn_activation")
        self.activation, self.use_grid_mlp = activation, use_grid_mlp
        self.merge = "-merge" in activation
        kind = "swiglu" if "swiglu" in activation else "square" if "square" in activation else "silu"
        self.so3_linear_1 = SO3Linear(in_channels, hidden_channels, lmax)
        self.scalar_mlp = self.gating_linear = self.grid_mlp = self.act = None
        if use_grid_mlp:
            if "s2" not in activation:
                raise ValueError(f"use_grid_mlp=True needs an s2 kind of ffn_activation, got {activation!r}")
            self.so3_grid = grid
            if activation.startswith("sep"):
                if kind == "silu":
                    first = [nn.Linear(in_channels, hidden_channels), nn.SiLU()]
                else:
                    first = [_GLULinear(in_channels, hidden_channels, True, kind)]
                self.scalar_mlp = nn.Sequential(*first, _maybe_dropout(dropout))
            h = hidden_channels
            if "gates2" in activation:
                self.grid_mlp = GatedSwiGLUGridMLP(in_channels, h, dropout)
            elif kind != "silu":
                self.grid_mlp = nn.Sequential(
                    _GLULinear(h, h, False, kind), _maybe_dropout(dropout), nn.Linear(h, h, bias=False)
                )
            else:
                self.grid_mlp = nn.Sequential(
                    nn.Linear(h, h, bias=False), nn.SiLU(), _maybe_dropout(dropout),
                    nn.Linear(h, h, bias=False), nn.SiLU(), _maybe_dropout(dropout),
                    nn.Linear(h, h, bias=False),
                )  # fmt: skip
        else:
            allowed = ("gate", "s2", "sep_s2", "sep-merge_gates2_swiglu")
            if activation not in allowed:
                raise ValueError(
                    f"use_grid_mlp=False takes ffn_activation in {list(allowed)}, got {activation!r}"
                )
            if activation == "gate":
                self.gating_linear = nn.Linear(in_channels, lmax * hidden_channels)
            elif activation == "sep_s2":
                self.gating_linear = nn.Linear(in_channels, hidden_channels)
            elif activation == "sep-merge_gates2_swiglu":
                self.so3_linear_1 = SO3Linear(in_channels, 2 * hidden_channels, lmax)
                self.gating_linear = nn.Linear(in_channels, 3 * hidden_channels)
            degrees = [l for l in range(1, lmax + 1) for _ in range(2 * l + 1)]
            self.act = make_activation(activation, grid, degrees, lmax, dropout)
        self.so3_linear_2 = SO3Linear(hidden_channels, out_channels, lmax)
        if self.merge:  # the official initialisation
            self.so3_linear_2.weight.data[0].mul_(1.0 / math.sqrt(2.0))

    def _grid_mlp(self, hidden: torch.Tensor, scalars_in: torch.Tensor) -> torch.Tensor:
        """The grid MLP ``[N, K, H] -> [N, K, H]``. Its first and last linear maps act on the
        channels only, so they commute with the projections to and from the grid: they run on
        the K coefficients instead of the G grid points (at L6 on a 20 x 20 grid, 49 rather than
        400), the same function. Only what lies between them runs on the grid."""
        to_grid = self.so3_grid.to_grid_matrix.to(hidden.dtype)  # [G, K]
        from_grid = self.so3_grid.from_grid_matrix.to(hidden.dtype).T  # [K, G]
        mlp = self.grid_mlp
        if "gates2" in self.activation:
            a, b = nn.functional.linear(hidden, mlp.grid_linear_1.weight).chunk(2, dim=-1)  # [N, K, H] each
            gates = torch.sigmoid(mlp.gating_linear(scalars_in))  # [N, 1, H]: the same at every grid point
            if isinstance(mlp.grid_drop, nn.Dropout) and self.training:
                product = from_grid @ mlp.grid_drop((to_grid @ (a * gates)) * (to_grid @ b))
            else:
                product = grid_product(self.so3_grid, a * gates, b)  # chunked: grid values never held whole
            return nn.functional.linear(product, mlp.grid_linear_2.weight)
        if isinstance(mlp[0], _GLULinear):  # swiglu / square: GLU, dropout, linear
            grid = mlp[1](mlp[0].function(to_grid @ nn.functional.linear(hidden, mlp[0].linear.weight)))
            return nn.functional.linear(from_grid @ grid, mlp[2].weight)
        # linear, SiLU, dropout, linear, SiLU, dropout, linear: the middle linear stays on the grid
        grid = mlp[2](nn.functional.silu(to_grid @ nn.functional.linear(hidden, mlp[0].weight)))
        grid = mlp[5](nn.functional.silu(mlp[3](grid)))
        return nn.functional.linear(from_grid @ grid, mlp[6].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scalars_in = x[:, :1]  # [N, 1, C_in]
        hidden = self.so3_linear_1(x)  # [N, K, H]
        if self.use_grid_mlp:
            hidden = self._grid_mlp(hidden, scalars_in)  # [N, K, H]
            if self.scalar_mlp is not None:
                scalars = self.scalar_mlp(scalars_in)  # [N, 1, H]
                first = hidden[:, :1] + scalars if self.merge else scalars
                hidden = torch.cat([first, hidden[:, 1:]], dim=1)
        elif self.gating_linear is not None:
            hidden = self.act(hidden, self.gating_linear(scalars_in)[:, 0])
        else:
            hidden = self.act(hidden)
        return self.so3_linear_2(hidden)
