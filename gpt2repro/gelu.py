"""The MLP's GELU with a backward pass that reads its inputs once.

The forward pass keeps only the GELU's input (`c_fc`'s output), not its output: 2 bytes x 4C per
token and layer less memory. Backward then needs the GELU output again (for `c_proj`'s weight
gradient), the GELU's input gradient and that gradient summed over rows (`c_fc`'s bias gradient).
On CUDA one Triton kernel computes all three from the GELU input and the output gradient, reading
each once; left to itself, inductor reads them a second time to sum the bias gradient. Elsewhere
the same arithmetic runs in plain PyTorch.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below is used
    triton = None

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# the kernel's tile, the fastest of ten tried on an H200; each tile writes one row of bias partial sums
BLOCK_ROWS, BLOCK_COLS, WARPS = 32, 128, 4

if triton is not None:

    @triton.jit
    def _gelu_backward_kernel(pre_ptr, grad_ptr, act_ptr, dpre_ptr, partial_ptr, M, N,
                              K0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offsets = rows[:, None] * N + cols[None, :]
        x = tl.load(pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        inner = K0 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
        act = 0.5 * x * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K0 * (1.0 + 3.0 * 0.044715 * x * x)
        dpre = g * dact
        tl.store(act_ptr + offsets, act.to(act_ptr.dtype.element_ty), mask=mask)
        tl.store(dpre_ptr + offsets, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(dpre, 0), mask=cols < N)


@torch.library.custom_op("gpt2repro::gelu_backward", mutates_args=())
def gelu_backward(pre: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For 2-D `pre` (GELU input) and `grad` (d loss / d GELU output): (GELU output, d loss / d pre,
    d loss / d pre summed over rows in fp32, or fp64 for fp64 inputs)."""
    M, N = pre.shape
    if triton is not None and pre.is_cuda and pre.dtype in (torch.bfloat16, torch.float16, torch.float32):
        act, dpre = torch.empty_like(pre), torch.empty_like(pre)
        partial = torch.empty(triton.cdiv(M, BLOCK_ROWS), N, dtype=torch.float32, device=pre.device)
        grid = (triton.cdiv(M, BLOCK_ROWS), triton.cdiv(N, BLOCK_COLS))
        _gelu_backward_kernel[grid](pre, grad, act, dpre, partial, M, N, K0=SQRT_2_OVER_PI,
                                    BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_COLS, num_warps=WARPS)
        return act, dpre, partial.sum(0)
    accumulate = torch.promote_types(pre.dtype, torch.float32)
    x, g = pre.to(accumulate), grad.to(accumulate)
    t = torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3)))
    dpre = g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x))
    return (0.5 * x * (1 + t)).to(pre.dtype), dpre.to(pre.dtype), dpre.sum(0)


@gelu_backward.register_fake
def _(pre, grad):
    accumulate = torch.promote_types(pre.dtype, torch.float32)
    return torch.empty_like(pre), torch.empty_like(pre), pre.new_empty(pre.size(1), dtype=accumulate)


class _MLP(torch.autograd.Function):
    """c_proj(gelu(c_fc(x))) for x (N, C), keeping x and c_fc's output for backward."""

    @staticmethod
    def forward(ctx, x, fc_weight, fc_bias, proj_weight, proj_bias):
        pre = F.linear(x, fc_weight, fc_bias)
        y = F.linear(F.gelu(pre, approximate="tanh"), proj_weight, proj_bias)
        ctx.save_for_backward(x, pre, fc_weight, proj_weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, pre, fc_weight, proj_weight = ctx.saved_tensors
        act, grad_pre, grad_fc_bias = gelu_backward(pre, grad_y @ proj_weight)
        return (
            grad_pre @ fc_weight,
            grad_pre.t() @ x,
            grad_fc_bias.to(pre.dtype),
            grad_y.t() @ act,
            grad_y.sum(0),
        )


def mlp(x: torch.Tensor, c_fc: torch.nn.Linear, c_proj: torch.nn.Linear) -> torch.Tensor:
    """`c_proj(gelu_tanh(c_fc(x)))` for x (..., C), with the backward pass above. Under autocast the
    matmuls and saved tensors are in the autocast dtype, as with plain nn.Linear."""
    shape = x.shape
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        y = _MLP.apply(x.reshape(-1, shape[-1]).to(dtype), c_fc.weight.to(dtype), c_fc.bias.to(dtype),
                       c_proj.weight.to(dtype), c_proj.bias.to(dtype))
    return y.view(*shape[:-1], y.size(-1))
