"""Where inference runs: the device, its autocast dtype, and sums over processes."""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError, first_line


def inference_device(device: str | None = None) -> tuple[torch.device, torch.dtype | None]:
    """The device to run on (CUDA when there is one) and its autocast dtype (bf16 where supported).
    A device that does not exist or cannot be used here is a UserError."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(1, device=device)  # fails at once for a device this machine lacks
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"cannot use device {device!r} here ({first_line(e, with_type=False)})") from None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, None


def autocast(device, dtype: torch.dtype | None):
    """torch.autocast on `device` in `dtype`, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def reduce_sum(tensor: torch.Tensor, all_reduce) -> torch.Tensor:
    """`all_reduce(tensor)` summed over processes (reducers may work in place and return None), or
    the tensor itself without one."""
    if all_reduce is None:
        return tensor
    result = all_reduce(tensor)
    return result if isinstance(result, torch.Tensor) else tensor
