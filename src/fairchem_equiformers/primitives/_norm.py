"""Equivariant normalisation of node features ``[N, (lmax+1)**2, C]``.

Scalars may be centred; every degree ``l > 0`` is only rescaled (by one factor per node shared
across m), so the result stays equivariant. Statistics are computed in float32 or wider even
under mixed precision. Parameter names follow the released EquiformerV2 checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn


def _degree_weights(lmax: int, first: int) -> torch.Tensor:
    """1/(2l+1) for every coefficient of degrees ``first..lmax``, divided by the number of
    degrees: a mean of squares where every degree counts equally."""
    weights = [1.0 / (2 * l + 1) for l in range(first, lmax + 1) for _ in range(2 * l + 1)]
    return torch.tensor(weights, dtype=torch.float64) / (lmax + 1 - first)


def _degree_index(lmax: int, first: int) -> torch.Tensor:
    """Row of a ``[lmax+1-first, C]`` per-degree table for each coefficient of degrees
    ``first..lmax`` (each degree's row 2l+1 times): a fixed-size gather, which compilers trace."""
    return torch.tensor([l - first for l in range(first, lmax + 1) for _ in range(2 * l + 1)])


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _degree_mean_square(x: torch.Tensor, degree_weights: torch.Tensor) -> torch.Tensor:
    """``[N, K', C] -> [N]``: the degree-balanced mean over ``K'`` (summed over channels) of
    ``x**2``, in ``x``'s precision also under autocast (which would run the einsum's matmul in
    half precision: the backward through ``rsqrt`` of a small mean square overflows float16)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.einsum("nkc,k->n", x.pow(2), degree_weights.to(x.dtype))


class EquivariantLayerNorm(nn.Module):
    """``layer_norm``: every degree normalised on its own (scalars centred first)."""

    def __init__(self, lmax: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.lmax, self.num_channels, self.eps = lmax, num_channels, eps
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, num_channels))
        self.affine_bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _upcast(x)
        out = []
        for l, feature in enumerate(x.split([2 * l + 1 for l in range(self.lmax + 1)], dim=1)):
            if l == 0:  # feature: [N, 2l+1, C]
                feature = feature - feature.mean(dim=2, keepdim=True)
            scale = (feature.pow(2).mean(dim=(1, 2), keepdim=True) + self.eps).rsqrt()  # [N, 1, 1]
            feature = feature * (scale * self.affine_weight[l])
            if l == 0:
                feature = feature + self.affine_bias
            out.append(feature)
        return torch.cat(out, dim=1)


class EquivariantLayerNormSH(nn.Module):
    """``layer_norm_sh``: LayerNorm on scalars; one degree-balanced RMS over all ``l > 0``."""

    def __init__(self, lmax: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.lmax, self.num_channels, self.eps = lmax, num_channels, eps
        self.norm_l0 = nn.LayerNorm(num_channels, eps=eps)
        self.affine_weight = nn.Parameter(torch.ones(lmax, num_channels))
        self.register_buffer("degree_weights", _degree_weights(lmax, 1), persistent=False)
        self.register_buffer("degree_index", _degree_index(lmax, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _upcast(x)
        if self.lmax == 0:
            return self.norm_l0(x)
        scalars, rest = x.split([1, x.shape[1] - 1], dim=1)  # [N, 1, C], [N, K-1, C]
        scalars = self.norm_l0(scalars)
        mean_square = _degree_mean_square(rest, self.degree_weights)
        scale = (mean_square / self.num_channels + self.eps).rsqrt()  # [N]
        weight = self.affine_weight.index_select(0, self.degree_index)  # [K-1, C]
        return torch.cat([scalars, rest * (scale[:, None, None] * weight)], dim=1)


class EquivariantRMSNormSH(nn.Module):
    """``rms_norm_sh``: scalars centred, then one degree-balanced RMS over all degrees
    (EquiformerV3's ``merge_layer_norm``). ``centering=False``: neither the centring nor the
    scalar bias (EquiformerV3's ``merge_rms_norm``)."""

    def __init__(self, lmax: int, num_channels: int, eps: float = 1e-5, centering: bool = True) -> None:
        super().__init__()
        self.lmax, self.num_channels, self.eps, self.centering = lmax, num_channels, eps, centering
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, num_channels))
        self.affine_bias = nn.Parameter(torch.zeros(num_channels)) if centering else None
        self.register_buffer("degree_weights", _degree_weights(lmax, 0), persistent=False)
        self.register_buffer("degree_index", _degree_index(lmax, 0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _upcast(x)
        if self.centering:
            scalars, rest = x.split([1, x.shape[1] - 1], dim=1)  # [N, 1, C], [N, K-1, C]
            x = torch.cat([scalars - scalars.mean(dim=2, keepdim=True), rest], dim=1)  # [N, K, C]
        mean_square = _degree_mean_square(x, self.degree_weights)
        scale = (mean_square / self.num_channels + self.eps).rsqrt()  # [N]
        out = x * (scale[:, None, None] * self.affine_weight.index_select(0, self.degree_index))
        if not self.centering:
            return out
        out_scalars, out_rest = out.split([1, out.shape[1] - 1], dim=1)
        return torch.cat([out_scalars + self.affine_bias, out_rest], dim=1)


class EquivariantRMSNormSHUncentred(EquivariantRMSNormSH):
    """``rms_norm_sh`` without centring or scalar bias (EquiformerV3's ``merge_rms_norm``)."""

    def __init__(self, lmax: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(lmax, num_channels, eps, centering=False)


NORMS = {
    "layer_norm": EquivariantLayerNorm,
    "layer_norm_sh": EquivariantLayerNormSH,
    "rms_norm_sh": EquivariantRMSNormSH,
    "rms_norm_sh_uncentred": EquivariantRMSNormSHUncentred,
}


def equivariant_norm(norm_type: str, lmax: int, num_channels: int) -> nn.Module:
    if norm_type not in NORMS:
        raise ValueError(f"norm_type must be one of {sorted(NORMS)}, got {norm_type!r}")
    return NORMS[norm_type](lmax, num_channels)
