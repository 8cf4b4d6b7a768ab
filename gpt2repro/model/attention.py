"""Causal self-attention from the packed (B, T, 3C) q/k/v projection.

With the optional `flash-attn-4` package (the `[gpu]` extra) on a Hopper or newer GPU, the
forward pass runs cuDNN's fused attention kernel and the backward pass FlashAttention-4's CuTe
kernel: at head size 64 on an H200 these are the faster of the two libraries in each direction
(BENCHMARKS.md). Both read q, k and v as strided views of the c_attn output, the output comes
back in the (B, T, C) layout c_proj reads, and the q, k and v gradients are written into one
(B, T, 3C) tensor, so neither the head transposes nor the gradient concatenation cost a copy.
Everywhere else (CPU, older GPUs, fp32 or fp16, the KV-cached generation path) PyTorch's
`scaled_dot_product_attention` runs. All compute softmax(q k^T / sqrt(hs)) v with a causal mask
and differ only in rounding.

The kernels are wrapped as custom operators, so `torch.compile` keeps them opaque.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.nn import functional as F

_compiling: Future | None = None  # the latest background compilation of the backward kernel (`precompile`)
_compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flash-attn-4-compile")  # one at a time, in order


@functools.cache
def _flash_backward():
    """flash-attn-4's backward entry point, or None where it is not installed (imported on first use:
    it loads the CuTe DSL compiler)."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd
    except ImportError:
        return None
    return _flash_attn_bwd


def split_heads(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3C) -> q, k, v as (B, T, nh, hs) views, no copy."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).unbind(2)


@torch.library.custom_op("gpt2repro::causal_attention", mutates_args=(), device_types="cuda")
def _attention(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, T, nh, hs), log-sum-exp of each row's scores (B, nh, T) in fp32), by cuDNN."""
    B, T, _ = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in split_heads(qkv, n_head))  # (B, nh, T, hs) views
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True)[:2]
    return out.transpose(1, 2).contiguous(), lse.reshape(B, n_head, T)  # cuDNN already wrote (B, T, nh, hs)


@_attention.register_fake
def _(qkv, n_head):
    B, T, C3 = qkv.shape
    return qkv.new_empty(B, T, n_head, C3 // (3 * n_head)), qkv.new_empty(B, n_head, T, dtype=torch.float32)


@torch.library.custom_op("gpt2repro::causal_attention_backward", mutates_args=(), device_types="cuda")
def _attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        n_head: int) -> torch.Tensor:
    """d loss / d qkv by FlashAttention-4, the q, k and v gradients written into one (B, T, 3C) tensor."""
    wait_for_precompile()  # the kernel this call needs may still be compiling
    return _flash_backward_into(grad_out, qkv, out, lse, n_head)


def wait_for_precompile() -> None:
    """Return once `precompile`'s background compilations, if any, have ended. The CuTe DSL compiles one
    kernel at a time in a process, so every caller of CuTe kernels waits for them (fused_mlp.py too)."""
    if _compiling is not None:
        _compiling.result()


def _flash_backward_into(grad_out, qkv, out, lse, n_head: int) -> torch.Tensor:
    grad_qkv = torch.empty_like(qkv)
    dq, dk, dv = split_heads(grad_qkv, n_head)
    q, k, v = split_heads(qkv, n_head)
    _flash_backward()(q, k, v, out, grad_out, lse, causal=True, dq=dq, dk=dk, dv=dv)
    return grad_qkv


@_attention_backward.register_fake
def _(grad_out, qkv, out, lse, n_head):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, ctx.n_head = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_backward(grad_out.contiguous(), qkv, out, lse, ctx.n_head), None


_attention.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result  # evaluated once while tracing, not traced
def _fused_available(device_index: int) -> bool:
    return (torch.backends.cuda.cudnn_sdp_enabled() and _flash_backward() is not None
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


def _fused_on(device: torch.device) -> bool:
    return device.type == "cuda" and _fused_available(device.index)


def fused_supported(qkv: torch.Tensor, n_head: int) -> bool:
    """Whether the cuDNN + FlashAttention-4 path takes this input: flash-attn-4 installed, cuDNN
    attention enabled, a CUDA GPU of compute capability 9.0 or newer, bf16, a head size that is a
    multiple of 8 up to 256."""
    return _fused_takes(qkv.dtype, qkv.size(-1) // (3 * n_head), qkv.device)


def _fused_takes(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and head_dim % 8 == 0 and head_dim <= 256 and _fused_on(device)


def precompile(device: torch.device, n_head: int, n_embd: int, seq_len: int) -> Future | None:
    """Start compiling FlashAttention-4's backward kernel for bf16 training at this width and sequence
    length in a background thread; the first backward pass waits for it. Returns the pending
    compilation (its result is None), or None off CUDA.

    flash-attn-4 loads its compiler and compiles its kernels in every new process at first use
    (about 4 s each on an H200), which would otherwise add to the first training step. The kernels
    depend on the head size, the layout of q, k and v and whether the sequence spans several tiles,
    not on the batch size: one sequence with the training shapes compiles the kernel the step runs.
    """
    global _compiling
    if device.type != "cuda":
        return None

    def run():
        if not _fused_takes(torch.bfloat16, n_embd // n_head, device):  # imports flash-attn-4, if installed
            return
        with torch.cuda.device(device), torch.no_grad():  # zeros: the values do not matter, and no RNG advances
            qkv = torch.zeros(1, seq_len, 3 * n_embd, device=device, dtype=torch.bfloat16)
            out, lse = _attention(qkv, n_head)
            _flash_backward_into(torch.zeros_like(out), qkv, out, lse, n_head)
            torch.cuda.synchronize(device)

    _compiling = _compiler.submit(run)
    return _compiling


def backend(device: torch.device, mixed_precision: str, attention: str = "auto") -> str:
    """The attention kernels that training under `mixed_precision` ("bf16", "fp16" or "no") with the
    model's `attention` setting uses on this device, for logs and benchmark reports."""
    fused = attention == "auto" and mixed_precision == "bf16" and _fused_on(device)
    return "cuDNN forward + flash-attn-4 backward" if fused else "scaled_dot_product_attention"


def causal_attention(qkv: torch.Tensor, n_head: int, fused: bool = True) -> torch.Tensor:
    """(B, T, 3C) packed q, k, v -> (B, T, C): every position attends to itself and the ones before.
    `fused=False` always takes scaled_dot_product_attention."""
    B, T, C3 = qkv.shape
    if fused and fused_supported(qkv, n_head):
        return _attention(qkv, n_head)[0].view(B, T, C3 // 3)
    q, k, v = (t.transpose(1, 2) for t in split_heads(qkv, n_head))  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).contiguous().view(B, T, C3 // 3)  # re-assemble the heads side by side
