"""A pre-LayerNorm's backward in one kernel with the residual stream's gradient (the `[gpu]` extra).

In a pre-LayerNorm block the residual stream x feeds both the LayerNorm and the skip connection, so
the gradient of x is the stream's gradient plus the LayerNorm's input gradient. With quack's CuTe
LayerNorm backward (installed with flash-attn-4) on a Hopper or newer GPU, for a bf16 residual stream
with gradients on, one kernel reads x, the LayerNorm output's gradient and the stream's gradient once,
and writes their sum, with per-multiprocessor partial sums of the weight and bias gradients. Otherwise
the compiler writes that backward from PyTorch's LayerNorm, adding the two gradients where it can fuse.

`layer_norm_fork(x, ln)` returns (x, ln(x)): the stream, passed through as a view so its gradient
reaches this backward, and the LayerNorm's output. The forward is traced (the compiler fuses it with
the residual add before it) and computes in fp32 from the stream, as autocast runs LayerNorm; the
output is rounded to bf16 for the matmul after it, which autocast does in the plain path too. The
backward computes in fp32 and differs from the plain path only in rounding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .attention import wait_for_precompile
from .fused_mlp import quack_runs_on


@functools.cache
def _kernels():
    """quack's LayerNorm backward and its choice of partial-sum rows, or None where it is not installed."""
    try:
        from quack.rmsnorm import _rmsnorm_bwd, get_sm_count
    except ImportError:
        return None
    return _rmsnorm_bwd, get_sm_count


@torch.compiler.assume_constant_result  # evaluated once while tracing, not traced
def _installed() -> bool:
    return _kernels() is not None


def _partials(x: torch.Tensor) -> torch.Tensor:
    """Room for the weight and bias gradients' fp32 partial sums: (2, rows quack's kernel uses, C)."""
    return x.new_empty(2, _kernels()[1](x.size(-1), x.device), x.size(-1), dtype=torch.float32)


@torch.library.custom_op("gpt2repro::layer_norm_grad", mutates_args=())
def _grad(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
          grad_stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For x (N, C) bf16 normalised with fp32 mean and rstd (N,): (grad_stream + the LayerNorm's input
    gradient, the weight and bias gradients' partial sums (2, P, C))."""
    wait_for_precompile()  # flash-attn-4's, in another thread: the CuTe DSL compiles one kernel at a time
    grad_x, partials = torch.empty_like(x), _partials(x)
    _kernels()[0](x, weight, grad_out, rstd, grad_x, partials[0], partials[1], grad_stream, None, mean=mean,
                  is_layernorm=True)
    return grad_x, partials


@_grad.register_fake
def _(x, weight, grad_out, mean, rstd, grad_stream):
    return torch.empty_like(x), _partials(x)


class _LayerNormFork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        out, mean, rstd = torch.native_layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return x.view_as(x), out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_stream: torch.Tensor, grad_out: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        C = x.size(-1)
        grad_x, partials = _grad(x.reshape(-1, C), weight, grad_out.reshape(-1, C).contiguous(), mean.reshape(-1),
                                 rstd.reshape(-1), grad_stream.reshape(-1, C).contiguous())
        grad_weight, grad_bias = partials.sum(1)
        return grad_x.view(x.shape), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


def applies(x: torch.Tensor) -> bool:
    """Whether the fused backward takes this (..., C) residual stream: quack installed, a CUDA GPU of
    compute capability 9.0 or newer, a bf16 stream (`bf16_residual` under bf16 autocast), C a multiple
    of 8, and gradients on."""
    return (x.dtype == torch.bfloat16 and x.size(-1) % 8 == 0 and torch.is_grad_enabled() and x.requires_grad
            and quack_runs_on(x.device) and _installed())


def layer_norm_fork(x: torch.Tensor, ln: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, ln(x)) for a bf16 (..., C) stream x, ln's backward in one kernel with x's other gradient."""
    return _LayerNormFork.apply(x, ln.weight, ln.bias, ln.eps)


def backend(device: torch.device, mixed_precision: str, fused: bool = True, bf16_residual: bool = True) -> str:
    """The LayerNorm backward that training with these settings uses on this device, for logs and reports."""
    on = fused and bf16_residual and mixed_precision == "bf16" and quack_runs_on(device) and _installed()
    return "quack's, with the residual gradient added in" if on else "compiled from PyTorch's"
