"""Mixed precision (``--amp``, ``torch.autocast``) around the package's custom autograd functions."""

from __future__ import annotations

import contextlib
import functools

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The half-precision dtype ``x``'s operations run in: autocast's when it is on for ``x``'s
    device, ``x``'s own when ``x`` is half precision, else ``None``."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in LOW_PRECISION else None


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype sums over edges, atoms or chunks accumulate in: float32 for half-precision ``x``."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def under_autocast(method):
    """For the ``forward`` and ``backward`` of a custom ``torch.autograd.Function``: under autocast
    (on the device of any tensor argument) the floating-point tensor arguments are cast to
    autocast's dtype and the body runs with autocast off, as ``torch.amp.custom_fwd(cast_inputs=
    ...)`` does for one device type: its matmuls run in half precision (bf16 on the CPU's matrix
    units), and a body accumulates sums over rows in float32 (:func:`accumulation_dtype`). The
    bodies mix their inputs in ``out=`` matmuls and saved tensors, which need one dtype. Autograd
    hands each input its gradient in the input's own dtype. Without autocast the call is
    unchanged (float64 stays float64)."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        active = sorted(d for d in devices if torch.is_autocast_enabled(d))
        if not active:
            return method(ctx, *args)
        dtype = torch.get_autocast_dtype(active[0])
        args = tuple(
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        )
        with contextlib.ExitStack() as stack:
            for device in active:
                stack.enter_context(torch.autocast(device, enabled=False))
            return method(ctx, *args)

    return wrapper


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")


def precision_scope(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Where a model's ``precision`` applies (its transformer blocks and direct heads): ``fp32``
    as the caller runs it (an outer autocast, e.g. ``--amp``, still applies); ``bf16`` under
    ``torch.autocast(bfloat16)`` on ``device``: linear layers, radial MLPs, edge rotations, SO(2)
    convolutions and grid activations in bf16, norms, softmax, sums over edges and the residual
    stream in float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
