"""Cross-entropy of the output layer, computed a chunk of rows at a time.

A plain training step holds the (B*T, V) logits for the backward pass and then writes their
gradient: at B=64, T=1024, V=50,304 that is 6.6 GB each in bf16. Here each chunk of rows gets its
logits, its loss and its gradients (for the hidden states and the output weight) in the forward
pass; the chunk's logits are overwritten by their own gradient and dropped before the next chunk,
and backward only scales the stored gradients.

The chunk loop is one custom operator, so `torch.compile` keeps it whole: left to itself, inductor
hoists every chunk's logits matmul to the front and holds all of them at once. On CUDA the softmax,
loss and logits gradient of a chunk are one Triton kernel (two reads and one write of the logits);
elsewhere they are plain PyTorch. The result equals `F.cross_entropy(x @ weight.T, targets)` up to
the rounding of the compute dtype.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below is used
    triton = None

CHUNK_ROWS = 8192  # default rows of logits alive at once: 8192 x 50,304 bf16 is 0.8 GB
XENT_BLOCK, XENT_WARPS = 8192, 16  # the softmax kernel's columns per iteration and warps per row (BENCHMARKS.md)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ops on x compute in: autocast's on x's device where it is enabled, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


if triton is not None:

    @triton.jit
    def _load_row(ptr, cols, V, classes):
        """These columns of a row of logits in fp32, -inf past `classes`. The load is masked by V, the row's
        length (GPT-2's padded 50,304, a multiple of 16), and the classes in registers: masked by 50,257,
        Triton would load the row 2 bytes at a time instead of 16 (scripts/loss_kernel_loads.py)."""
        x = tl.load(ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        return tl.where(cols < classes, x, -float("inf"))

    @triton.jit
    def _softmax_xent_kernel(logits_ptr, targets_ptr, loss_ptr, scale_ptr, stride, V, classes, ignore_index,
                             WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One row: its loss over the first `classes` of its V logits, and (WRITE_GRAD) scale * (softmax -
        onehot) written over its logits (0 in the columns past `classes`)."""
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        m = -float("inf")
        s = 0.0
        for start in range(0, classes, BLOCK):  # online max and sum of exponentials
            cols = start + tl.arange(0, BLOCK)
            x = _load_row(ptr, cols, V, classes)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        safe = tl.where(valid, target, 0)
        picked = tl.load(ptr + safe).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = _load_row(ptr, cols, V, classes)
                p = tl.exp(x - lse)
                grad = tl.where(cols == safe, p - 1.0, p) * scale
                tl.store(ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: torch.Tensor | None,
                  classes: int | None = None, block: int = XENT_BLOCK, warps: int = XENT_WARPS) -> torch.Tensor:
    """The summed loss of these rows of logits, the softmax taken over their first `classes` columns
    (all by default; the others are padding that is never a target); given `grad_scale` (1 / counted
    rows, a 0-d tensor), the logits are overwritten by d(mean loss)/d(logits). On CUDA one Triton
    kernel does it, `block` columns per iteration with `warps` warps per row."""
    classes = logits.size(1) if classes is None else classes
    accumulate = torch.promote_types(logits.dtype, torch.float32)
    if triton is not None and logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16, torch.float32):
        losses = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        scale = grad_scale if grad_scale is not None else losses  # unread without WRITE_GRAD
        _softmax_xent_kernel[(logits.size(0),)](
            logits, targets, losses, scale, logits.stride(0), logits.size(1), classes, ignore_index,
            WRITE_GRAD=grad_scale is not None, BLOCK=block, num_warps=warps,
        )
        return losses.sum(dtype=accumulate)
    full = logits[:, :classes].to(accumulate)
    lse = torch.logsumexp(full, dim=1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    loss_sum = torch.where(valid, lse - full.gather(1, safe.unsqueeze(1)).squeeze(1), 0.0).sum()
    if grad_scale is not None:
        grad = torch.exp(full - lse.unsqueeze(1))
        grad[torch.arange(grad.size(0), device=grad.device), safe] -= 1.0
        logits[:, :classes].copy_(grad * (valid.to(accumulate) * grad_scale).unsqueeze(1))
        logits[:, classes:].zero_()
    return loss_sum


def _add_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, with `out` in fp32 (or fp64) and a, b in the compute dtype."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)  # fp32 accumulation, no fp32 copies of a, b
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


@torch.library.custom_op("gpt2repro::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          classes: int, chunk_rows: int, with_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, d loss/dx, d loss/dweight), x and weight in the compute dtype, the softmax over the
    first `classes` rows of weight; no gradients (empty tensors) without `with_grads`. d loss/dweight is
    in fp32 (fp64 for fp64 inputs)."""
    accumulate = torch.promote_types(x.dtype, torch.float32)
    rows = (targets != ignore_index).sum().to(accumulate)
    grad_scale = 1.0 / rows if with_grads else None
    grad_x = torch.empty(x.shape if with_grads else (0,), dtype=x.dtype, device=x.device)
    grad_w = torch.zeros(weight.shape if with_grads else (0,), dtype=accumulate, device=x.device)
    loss_sum = torch.zeros((), dtype=accumulate, device=x.device)
    for start in range(0, x.size(0), chunk_rows):
        xc = x[start : start + chunk_rows]
        logits = xc @ weight.t()
        loss_sum += softmax_xent_(logits, targets[start : start + chunk_rows], ignore_index, grad_scale, classes)
        if with_grads:  # logits now hold their gradient
            torch.mm(logits, weight, out=grad_x[start : start + chunk_rows])
            _add_matmul_(grad_w, logits.t(), xc)
        del logits  # before the next chunk's logits are allocated
    return loss_sum / rows, grad_x, grad_w


@_linear_cross_entropy.register_fake
def _(x, weight, targets, ignore_index, classes, chunk_rows, with_grads):
    accumulate = torch.promote_types(x.dtype, torch.float32)
    return (
        x.new_empty((), dtype=accumulate),
        x.new_empty(x.shape if with_grads else (0,)),
        x.new_empty(weight.shape if with_grads else (0,), dtype=accumulate),
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, classes, chunk_rows, dtype):
        loss, grad_x, grad_w = _linear_cross_entropy(x.to(dtype), weight.to(dtype), targets, ignore_index, classes,
                                                     chunk_rows, True)
        ctx.save_for_backward(grad_x.to(x.dtype), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1, chunk_rows: int | None = None,
    classes: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` (x (N, C), weight (V, C)) against targets (N,), ignoring `ignore_index`.
    The softmax runs over the first `classes` of the V outputs (all by default): rows of weight past
    them are padding, which gets no gradient from the loss.

    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as the plain
    path does; gradients reach `x` and `weight` in their own dtypes.
    """
    chunk_rows = chunk_rows or CHUNK_ROWS
    classes = weight.size(0) if classes is None else classes
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, classes, chunk_rows, dtype)
        return _linear_cross_entropy(x.to(dtype), weight.to(dtype), targets, ignore_index, classes, chunk_rows,
                                     False)[0]
