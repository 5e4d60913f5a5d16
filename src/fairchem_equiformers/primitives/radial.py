"""Radial bases of the interatomic distance and the MLPs that turn them into weights."""

from __future__ import annotations

import torch
from torch import nn


class GaussianBasis(nn.Module):
    """Gaussians with evenly spaced centres on [start, stop], width = ``width_factor`` spacings.

    Centres and width are fixed as the released EquiformerV2 computes them (a float32
    ``linspace``): with 600 Gaussians over 12 A each is only 0.04 A wide, so moving a centre
    by one float32 ulp would visibly change a trained model's outputs.

    Shapes: ``distance: [E] -> [E, num_basis]``."""

    def __init__(self, start: float, stop: float, num_basis: int, width_factor: float) -> None:
        super().__init__()
        centers = torch.linspace(start, stop, num_basis, dtype=torch.float32)
        self.coefficient = -0.5 / (width_factor * (centers[1] - centers[0])).item() ** 2
        self.register_buffer("centers", centers.double(), persistent=False)
        self.num_basis = num_basis

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        diff = distance[:, None] - self.centers.to(distance.dtype)
        return torch.exp(self.coefficient * diff * diff)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, range=[{float(self.centers[0])}, {float(self.centers[-1])}]"


class RadialMLP(nn.Module):
    """Linear -> LayerNorm -> SiLU blocks, then a final Linear; ``channels = [in, ..., out]``.

    Shapes: ``[E, channels[0]] -> [E, channels[-1]]``."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers.append(nn.Linear(c_in, c_out))
            if i < len(channels) - 2:
                layers += [nn.LayerNorm(c_out), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
