"""GPT-2's MLP with its GELU inside the matmuls around it (the `[gpu]` extra).

With quack's CuTe GEMMs (installed with flash-attn-4) on a Hopper or newer GPU, under bf16 autocast
and with gradients on:
- forward: c_fc's matmul adds its bias and applies the GELU in its epilogue, writing both the
  pre-activation h, kept for backward, and GELU(h), c_proj's input, freed once c_proj has run;
- backward: the matmul that turns c_proj's output gradient into the gradient of GELU(h) multiplies
  it by GELU'(h) in its epilogue, and writes GELU(h) again for c_proj's weight gradient.

So no GELU kernel runs on its own in either direction, and only h is kept, as with `recompute_gelu`.
Given the block's bf16 residual stream (`fused_residual`), c_proj's matmul is quack's too: its
epilogue adds c_proj's bias and the stream to the fp32 product, so the block's output is rounded to
bf16 once and no add kernel runs after it. The other matmuls are cuBLAS's, as in the plain path. Both
paths compute GPT-2's tanh GELU in fp32 and differ only in rounding: here the GELU and its derivative
take the matmul's fp32 result before it is rounded to bf16.

The forward and quack's backward matmul are custom operators, opaque to `torch.compile`; the rest of
the backward (the other three matmuls and the bias gradients) is traced, so the compiler writes the
bias-gradient sums.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .attention import wait_for_precompile
from .loss import compute_dtype

GELU = "gelu_tanh_approx"  # quack's name for GPT-2's gelu_new


@functools.cache
def _kernels():
    """quack's (gemm_act, gemm_dact, gemm_add), or None where it is not installed (imported on first use: it
    loads the CuTe DSL compiler)."""
    try:
        from quack.gemm_interface import gemm_act, gemm_add, gemm_dact
    except ImportError:
        return None
    return gemm_act, gemm_dact, gemm_add


@torch.library.custom_op("gpt2repro::gelu_mlp", mutates_args=(), device_types="cuda")
def _mlp(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor,
         residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C) -> (output (N, C), pre-activation h (N, 4C)), all bf16; the output includes `residual`
    (N, C) where one is given."""
    wait_for_precompile()  # flash-attn-4's, in another thread: the CuTe DSL compiles one kernel at a time
    gemm_act, _, gemm_add = _kernels()
    h, g = gemm_act(x, w_fc.t(), bias=b_fc, activation=GELU)  # h = x W_fc^T + b_fc, g = GELU(h)
    if residual is None:
        return torch.addmm(b_proj, g, w_proj.t()), h
    return gemm_add(g, w_proj.t(), residual, bias=b_proj), h  # residual + g W_proj^T + b_proj, rounded once


@_mlp.register_fake
def _(x, w_fc, b_fc, w_proj, b_proj, residual):
    return x.new_empty(x.size(0), w_proj.size(0)), x.new_empty(x.size(0), w_fc.size(0))


@torch.library.custom_op("gpt2repro::gelu_mlp_grad_h", mutates_args=(), device_types="cuda")
def _grad_h(grad_out: torch.Tensor, w_proj: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_out W_proj) * GELU'(h), the gradient of h, and GELU(h) again, for c_proj's weight gradient."""
    wait_for_precompile()
    return _kernels()[1](grad_out, w_proj, h, activation=GELU)


@_grad_h.register_fake
def _(grad_out, w_proj, h):
    return torch.empty_like(h), torch.empty_like(h)


def _setup_context(ctx, inputs, output):
    x, w_fc, _, w_proj, _, residual = inputs
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, w_fc, w_proj, output[1])


def _backward(ctx, grad_out, _):  # h is an output only to be saved, so no gradient flows into it
    x, w_fc, w_proj, h = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_h, g = _grad_h(grad_out, w_proj, h)
    grad_residual = grad_out if ctx.has_residual else None
    return grad_h @ w_fc, grad_h.t() @ x, grad_h.sum(0), grad_out.t() @ g, grad_out.sum(0), grad_residual


_mlp.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result  # evaluated once while tracing, not traced
def _available(device_index: int) -> bool:
    return _kernels() is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def quack_runs_on(device: torch.device) -> bool:
    """Whether quack is installed and this is a CUDA GPU of compute capability 9.0 or newer."""
    return device.type == "cuda" and _available(device.index)


def applies(x: torch.Tensor) -> bool:
    """Whether the fused MLP takes this (..., C) input: quack installed, a CUDA GPU of compute
    capability 9.0 or newer, bf16 compute, C a multiple of 8, and gradients on (generation and
    evaluation, whose row counts vary from call to call, keep the plain path)."""
    return (compute_dtype(x) == torch.bfloat16 and x.size(-1) % 8 == 0 and torch.is_grad_enabled()
            and quack_runs_on(x.device))


def gelu_mlp(x: torch.Tensor, c_fc: nn.Linear, c_proj: nn.Linear, residual: torch.Tensor | None = None) -> torch.Tensor:
    """c_proj(GELU(c_fc(x))) (+ residual, a bf16 tensor of x's shape) for (..., C) x, in bf16 with the GELU
    in the matmul epilogues."""
    bf16 = torch.bfloat16
    weights = (t.to(bf16) for t in (c_fc.weight, c_fc.bias, c_proj.weight, c_proj.bias))  # autocast's casts
    rows = (-1, x.size(-1))
    out, _ = _mlp(x.reshape(rows).to(bf16), *weights, None if residual is None else residual.reshape(rows))
    return out.view(x.shape)


def backend(device: torch.device, mixed_precision: str, fused: bool = True, residual: bool = False) -> str:
    """The MLP kernels that training under `mixed_precision` with the model's `fused_mlp` setting (and
    `fused_residual` with a bf16 stream: `residual`) uses on this device, for logs and benchmark reports."""
    if not (fused and mixed_precision == "bf16" and quack_runs_on(device)):
        return "separate matmul and GELU kernels"
    return "GELU and the residual add in quack's matmul epilogues" if residual else "GELU in quack's matmul epilogues"
