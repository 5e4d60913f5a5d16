"""Radial bases of the interatomic distance and the MLPs that turn them into weights."""

from __future__ import annotations

import math

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
        basis = torch.exp(self.coefficient * diff * diff)
        # Narrow Gaussians come out subnormal a little before they underflow (float32: 0.53 to
        # 0.58 A from their centre at the released width). Every matmul reading a subnormal
        # takes the CPU's slow path (the radial MLPs' first layers ran several times slower);
        # zero is as good an answer, far below the rounding of any sum the value enters.
        return basis.masked_fill(basis < torch.finfo(basis.dtype).tiny, 0.0)

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


class PolynomialEnvelope(nn.Module):
    """Smooth cutoff ``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)`` of ``x = d / cutoff``
    (DimeNet, Klicpera et al. 2020): 1 at 0, and it and its first two derivatives vanish at the
    cutoff; zero beyond it.

    Shapes: ``scaled_distance: [E] -> [E]``."""

    def __init__(self, exponent: int = 5) -> None:
        super().__init__()
        if exponent < 1:
            raise ValueError(f"envelope exponent must be at least 1, got {exponent}")
        self.exponent = exponent
        p = float(exponent)  # floats: torch.compile(dynamic=True) would trace an int attribute symbolically
        self._powers = (p, p + 1, p + 2)
        self._coefficients = ((p + 1) * (p + 2) / 2, p * (p + 2), p * (p + 1) / 2)

    def forward(self, scaled_distance: torch.Tensor) -> torch.Tensor:
        x, (a, b, c), (p, q, r) = scaled_distance, self._coefficients, self._powers
        value = 1 - a * x**p + b * x**q - c * x**r
        return torch.where(x < 1, value, torch.zeros_like(value))

    def extra_repr(self) -> str:
        return f"exponent={self.exponent}"


class BesselBasis(nn.Module):
    """``sqrt(2/c) sin(n pi d / c) / d`` for ``n = 1..num_basis``, times a polynomial envelope
    (DimeNet's radial basis; the frequencies ``n pi`` are fixed here, not trained).

    Shapes: ``distance: [E] -> [E, num_basis]``."""

    def __init__(self, cutoff: float, num_basis: int, envelope_exponent: int = 5) -> None:
        super().__init__()
        self.cutoff, self.num_basis = cutoff, num_basis
        self.envelope = PolynomialEnvelope(envelope_exponent)
        self.register_buffer(
            "frequencies", math.pi * torch.arange(1, num_basis + 1, dtype=torch.float64), persistent=False
        )

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        x = (distance / self.cutoff)[:, None]  # [E, 1]
        frequencies = self.frequencies.to(distance.dtype)
        bessel = math.sqrt(2 / self.cutoff) * torch.sin(frequencies * x) / distance[:, None]
        return self.envelope(x) * bessel

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, cutoff={self.cutoff}"


class ExpNormalBasis(nn.Module):
    """``cos_cutoff(d) exp(-beta (exp(-alpha d) - mu_k)^2)`` with ``alpha = 5 / cutoff``, the
    ``mu_k`` evenly spaced on ``[exp(-cutoff), 1]`` and ``beta = (2 (1 - exp(-cutoff)) / K)^-2``
    (PhysNet's expansion as TorchMD-Net and Equiformer's MD17 models use it, not trained);
    ``cos_cutoff(d) = (cos(pi d / cutoff) + 1) / 2`` below the cutoff, 0 beyond.

    Shapes: ``distance: [E] -> [E, num_basis]``."""

    def __init__(self, cutoff: float, num_basis: int) -> None:
        super().__init__()
        self.cutoff, self.num_basis = cutoff, num_basis
        start = math.exp(-cutoff)
        self.register_buffer(
            "means", torch.linspace(start, 1.0, num_basis, dtype=torch.float64), persistent=False
        )
        self.beta = (2 / num_basis * (1 - start)) ** -2
        self.alpha = 5.0 / cutoff

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        d = distance[:, None]  # [E, 1]
        envelope = 0.5 * (torch.cos(math.pi * d / self.cutoff) + 1.0) * (d < self.cutoff)
        means = self.means.to(distance.dtype)
        return envelope * torch.exp(-self.beta * (torch.exp(-self.alpha * d) - means) ** 2)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, cutoff={self.cutoff}"
