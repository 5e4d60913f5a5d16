"""Node-wise feed-forward network with an S2 grid MLP, S2 activation or gate activation."""

from __future__ import annotations

import torch
from torch import nn

from fairchem_equiformers.primitives import (
    GateActivation,
    S2Activation,
    S2Grid,
    SeparableS2Activation,
    SO3Linear,
    grid_mlp,
)


class FeedForward(nn.Module):
    """SO3 linear -> point-wise non-linearity on the sphere -> SO3 linear.

    With ``use_grid_mlp`` the non-linearity is a three-layer MLP applied at every grid point
    (the released models); otherwise a separable S2 activation, a plain S2 activation or a
    gate activation. ``use_sep_s2_act`` computes the output scalars from the input scalars by
    their own path.

    Shapes: ``x: [N, K, C_in] -> [N, K, C_out]``.
    """

    def __init__(
        self,
        lmax: int,
        grid: S2Grid,
        in_channels: int,
        hidden_channels: int,
        output_channels: int,
        use_gate_act: bool,
        use_grid_mlp: bool,
        use_sep_s2_act: bool,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.use_grid_mlp = use_grid_mlp
        self.use_gate_act = use_gate_act
        self.use_sep_s2_act = use_sep_s2_act
        self.so3_linear_1 = SO3Linear(in_channels, hidden_channels, lmax=lmax)
        self.scalar_mlp = None
        self.gating_linear = None
        if use_grid_mlp:
            if use_sep_s2_act:
                self.scalar_mlp = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.SiLU())
            self.grid_mlp = nn.Sequential(
                nn.Linear(hidden_channels, hidden_channels, bias=False),
                nn.SiLU(),
                nn.Linear(hidden_channels, hidden_channels, bias=False),
                nn.SiLU(),
                nn.Linear(hidden_channels, hidden_channels, bias=False),
            )
        elif use_gate_act:
            self.gating_linear = nn.Linear(in_channels, lmax * hidden_channels)
            degrees = [l for l in range(1, lmax + 1) for _ in range(2 * l + 1)]
            self.gate_act = GateActivation(degrees, lmax, hidden_channels)
        elif use_sep_s2_act:
            self.gating_linear = nn.Linear(in_channels, hidden_channels)
            self.s2_act = SeparableS2Activation(grid)
        else:
            self.s2_act = S2Activation(grid)
        self.so3_linear_2 = SO3Linear(hidden_channels, output_channels, lmax=lmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scalars = x[:, 0]  # [N, C_in]
        hidden = self.so3_linear_1(x)  # [N, K, hidden]
        if self.use_grid_mlp:
            hidden = grid_mlp(self.grid, self.grid_mlp, hidden)  # [N, K, hidden]
            if self.scalar_mlp is not None:
                hidden = torch.cat([self.scalar_mlp(scalars)[:, None], hidden[:, 1:]], dim=1)
        elif self.use_gate_act:
            hidden = self.gate_act(self.gating_linear(scalars), hidden)
        elif self.use_sep_s2_act:
            hidden = self.s2_act(self.gating_linear(scalars), hidden)
        else:
            hidden = self.s2_act(hidden)
        return self.so3_linear_2(hidden)
