"""Layers on flat e3nn irreps features ``[*, irreps.dim]`` (blocks of ``mul x ir``, each block laid
out as ``[mul, 2l+1]``), for models whose degrees carry different channel counts.

Shape symbols: N nodes, E edges, D = ``irreps.dim``, H heads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import e3nn
import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn


def is_even_scalar(ir: o3.Irrep) -> bool:
    return ir.l == 0 and ir.p == 1


class IrrepsLayerNorm(nn.Module):
    """Equivariant layer norm: each ``mul x ir`` block is divided by the root mean square of its
    channels and components (even scalars centred first), then scaled per channel; even scalars
    also get a bias. This is Equiformer's ``EquivariantLayerNormV2`` with ``component``
    normalisation.

    Shapes: ``x: [N, D] -> [N, D]``."""

    def __init__(self, irreps: o3.Irreps | str, eps: float = 1e-5) -> None:
        super().__init__()
        self.irreps, self.eps = o3.Irreps(irreps), eps
        num_scalars = sum(mul for mul, ir in self.irreps if is_even_scalar(ir))
        self.affine_weight = nn.Parameter(torch.ones(self.irreps.num_irreps))
        self.affine_bias = nn.Parameter(torch.zeros(num_scalars))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, start, weight_start, bias_start = [], 0, 0, 0
        for mul, ir in self.irreps:
            block = x.narrow(1, start, mul * ir.dim).reshape(-1, mul, ir.dim)  # [N, mul, 2l+1]
            start += mul * ir.dim
            if is_even_scalar(ir):
                block = block - block.mean(dim=1, keepdim=True)
            scale = (block.pow(2).mean(dim=(1, 2), keepdim=True) + self.eps).rsqrt()  # [N, 1, 1]
            weight = self.affine_weight[weight_start : weight_start + mul]
            weight_start += mul
            block = block * scale * weight[:, None]
            if is_even_scalar(ir):
                block = block + self.affine_bias[bias_start : bias_start + mul, None]
                bias_start += mul
            out.append(block.reshape(-1, mul * ir.dim))
        return torch.cat(out, dim=1)

    def extra_repr(self) -> str:
        return f"{self.irreps}, eps={self.eps}"


class DepthwiseTensorProduct(nn.Module):
    """Channel-wise (``uvu``) tensor product of features with edge spherical harmonics: every
    input block ``mul x ir_in`` times every harmonic degree gives ``mul x ir_out`` for each
    ``ir_out`` in ``ir_in x ir_sh`` that ``irreps_target`` contains (even scalars always kept).

    The weights (one per channel and path) are either given per edge (``shared_weights=False``,
    e.g. from a radial MLP, ``weight: [E, weight_numel]``) or are the module's own.

    Shapes: ``x: [E, D_in]``, ``sh: [E, D_sh] -> [E, irreps_out.dim]``."""

    def __init__(
        self,
        irreps_in: o3.Irreps | str,
        irreps_sh: o3.Irreps | str,
        irreps_target: o3.Irreps | str,
        shared_weights: bool,
    ) -> None:
        super().__init__()
        irreps_in, irreps_sh, irreps_target = (
            o3.Irreps(irreps_in),
            o3.Irreps(irreps_sh),
            o3.Irreps(irreps_target),
        )
        outputs, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_sh) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in irreps_target or is_even_scalar(ir_out):
                        instructions.append((i, j, len(outputs), "uvu", True))
                        outputs.append((mul, ir_out))
        irreps_out, permutation, _ = o3.Irreps(outputs).sort()
        instructions = [(i, j, permutation[k], mode, train) for i, j, k, mode, train in instructions]
        self.tp = o3.TensorProduct(
            irreps_in, irreps_sh, irreps_out, instructions,
            internal_weights=shared_weights, shared_weights=shared_weights,
        )  # fmt: skip
        self.irreps_in, self.irreps_out = irreps_in, irreps_out
        self.weight_numel = self.tp.weight_numel

    def forward(self, x: torch.Tensor, sh: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.tp(x, sh, weight)


def head_index(irreps_head: o3.Irreps, num_heads: int) -> torch.Tensor:
    """For features of ``irreps_head`` repeated over ``num_heads`` heads (each block ``mul x ir``
    becomes ``(num_heads * mul) x ir``, head-major), the head of every component ``[D]``."""
    index = [torch.arange(num_heads).repeat_interleave(mul * ir.dim) for mul, ir in o3.Irreps(irreps_head)]
    return torch.cat(index)


def repeat_heads(irreps_head: o3.Irreps, num_heads: int) -> o3.Irreps:
    """``irreps_head`` with every multiplicity times ``num_heads`` (the layout of ``head_index``)."""
    return o3.Irreps([(num_heads * mul, ir) for mul, ir in o3.Irreps(irreps_head)])


def gate_activation(irreps_out: o3.Irreps | str) -> nn.Module:
    """An ``e3nn.nn.Gate`` whose output is ``irreps_out``: even scalars pass through SiLU, every
    other channel is multiplied by the sigmoid of its own extra even scalar (the gates). Its
    ``irreps_in`` (scalars, gates, gated) is what the preceding linear layer must produce; with
    only even scalars it is a plain SiLU (``e3nn.nn.Activation``). Both normalise the
    activations to unit second moment, as e3nn does."""
    irreps_out = o3.Irreps(irreps_out)
    scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if is_even_scalar(ir)]).simplify()
    gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if not is_even_scalar(ir)])
    if not gated:
        return e3nn_nn.Activation(scalars, [nn.functional.silu])
    gates = o3.Irreps(f"{gated.num_irreps}x0e")
    return e3nn_nn.Gate(scalars, [nn.functional.silu], gates, [torch.sigmoid], gated)


_WIGNER_3J_BUFFER = re.compile(r"_w3j_(\d+)_(\d+)_(\d+)")


def restore_exact_wigner_3j(module: nn.Module) -> None:
    """Reset every Wigner 3j buffer of e3nn's compiled tensor products in ``module`` to exact
    values in its current dtype and device. e3nn builds them in the default float32, so a cast to
    float64 alone keeps the float32 rounding (an equivariance error of ~1e-9). Call it from a
    model's ``_apply``, after the cast."""
    for submodule in module.modules():
        for name, buffer in submodule._buffers.items():
            match = _WIGNER_3J_BUFFER.fullmatch(name)
            if match is not None and buffer is not None:
                exact = o3.wigner_3j(*(int(l) for l in match.groups()), dtype=torch.float64)
                submodule._buffers[name] = exact.to(device=buffer.device, dtype=buffer.dtype)


@contextmanager
def e3nn_eager() -> Iterator[None]:
    """e3nn modules built inside run their generated code eagerly: without TorchScript and
    without einsum-path search, which make building a model take many seconds and, at the
    sizes used here, do not make it faster (measured on CPU). Also usable as a decorator."""
    defaults = e3nn.get_optimization_defaults()
    e3nn.set_optimization_defaults(jit_script_fx=False, optimize_einsums=False)
    try:
        yield
    finally:
        e3nn.set_optimization_defaults(**defaults)
