"""Mixed precision (``--amp``, ``torch.autocast``) around the package's custom autograd functions."""

from __future__ import annotations

import contextlib
import functools

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def float32_under_autocast(method):
    """For the ``forward`` and ``backward`` of a custom ``torch.autograd.Function``: under autocast
    (on the device of any tensor argument) half-precision tensor arguments are cast to float32 and
    the body runs with autocast off, as ``torch.amp.custom_fwd(cast_inputs=torch.float32)`` does for
    one device type. The bodies mix their inputs in ``out=`` matmuls and saved tensors, which
    need one dtype; autocast would give the matmuls half-precision results. Without autocast the
    call is unchanged (float64 stays float64)."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        active = sorted(d for d in devices if torch.is_autocast_enabled(d))
        if not active:
            return method(ctx, *args)
        args = tuple(
            a.float() if isinstance(a, torch.Tensor) and a.dtype in LOW_PRECISION else a for a in args
        )
        with contextlib.ExitStack() as stack:
            for device in active:
                stack.enter_context(torch.autocast(device, enabled=False))
            return method(ctx, *args)

    return wrapper
