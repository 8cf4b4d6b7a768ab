"""Time the loss kernel (gpt2repro/model/loss.py, `softmax_xent_`) on one chunk of logits for each block size and warp count.

    python scripts/bench_loss_kernel.py [--rows 8192] [--vocab 50304] [--classes 50257]

--vocab is the row's length (the padded vocabulary), --classes the columns the softmax spans, as in
training (GPT-2's 50,257 tokens; the padding columns get a zero gradient).

One JSON line per setting (ms from triton.testing.do_bench, the logits' read-read-write traffic in
TB/s, the summed loss's relative error and the gradient's largest error against fp32 PyTorch), then the fastest settings and the time of copying the
chunk once (one read and one write), for scale. Then a candidate kernel that holds each whole row in
registers and so reads the logits once ("one read" lines; slower on an H200, BENCHMARKS.md). Needs CUDA
and Triton.
"""

import argparse
import json

import torch
import triton
import triton.language as tl
import triton.testing

from gpt2repro.model.loss import _load_row, softmax_xent_

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rows", type=int, default=8192)
parser.add_argument("--vocab", type=int, default=50304)
parser.add_argument("--classes", type=int, default=50257)
args = parser.parse_args()
R, V, C = args.rows, args.vocab, args.classes

generator = torch.Generator(device="cuda").manual_seed(0)
logits = (3 * torch.randn(R, V, device="cuda", generator=generator)).to(torch.bfloat16)
targets = torch.randint(0, C, (R,), device="cuda", generator=generator)
scale = torch.tensor(1.0 / R, device="cuda")
full = logits[:, :C].float()
ref_loss = torch.logsumexp(full, 1) - full.gather(1, targets[:, None])[:, 0]
ref_grad = torch.zeros(R, V, device="cuda")
ref_grad[:, :C] = torch.softmax(full, 1)
ref_grad[torch.arange(R, device="cuda"), targets] -= 1
ref_grad *= scale
del full

work, results = logits.clone(), []
for block in (2048, 4096, 8192, 16384):
    for warps in (4, 8, 16, 32):
        def run():
            return softmax_xent_(work, targets, -1, scale, classes=C, block=block, warps=warps)

        work.copy_(logits)
        loss_err = abs(run().item() - ref_loss.sum().item()) / ref_loss.sum().item()
        grad_err = ((work.float() - ref_grad).abs().max() / ref_grad.abs().max()).item()
        ms = triton.testing.do_bench(run, warmup=20, rep=100)  # in place: timing does not depend on the values
        results.append({"block": block, "warps": warps, "ms": round(ms, 4), "tb_s": round(3 * R * V * 2 / ms / 1e9, 2),
                        "loss_err": loss_err, "grad_rel_err": grad_err})
        print(json.dumps(results[-1]), flush=True)
print("fastest:", json.dumps(sorted(results, key=lambda r: r["ms"])[:4]))


@triton.jit
def _one_read_kernel(logits_ptr, targets_ptr, loss_ptr, scale_ptr, stride, V, classes, BLOCK: tl.constexpr):
    """A candidate: the whole row (BLOCK >= V columns) held in registers, so the logits are read once, not twice."""
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK)
    x = _load_row(ptr, cols, V, classes)
    m = tl.max(x, 0)
    picked = tl.sum(tl.where(cols == target, x, 0.0), 0)
    e = tl.exp(x - m)
    s = tl.sum(e, 0)
    tl.store(loss_ptr + row, m + tl.log(s) - picked)
    p = e * (tl.load(scale_ptr) / s)
    grad = tl.where(cols == target, p - tl.load(scale_ptr), p)
    tl.store(ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


one_read = []
for warps in (16, 32):
    try:
        losses = torch.empty(R, device="cuda")

        def run_one():
            _one_read_kernel[(R,)](work, targets, losses, scale, work.stride(0), V, C,
                                   BLOCK=triton.next_power_of_2(V), num_warps=warps)
            return losses.sum()

        work.copy_(logits)
        loss_err = abs(run_one().item() - ref_loss.sum().item()) / ref_loss.sum().item()
        grad_err = ((work.float() - ref_grad).abs().max() / ref_grad.abs().max()).item()
        ms = triton.testing.do_bench(run_one, warmup=20, rep=100)
        one_read.append({"kernel": "one read", "warps": warps, "ms": round(ms, 4), "tb_s": round(2 * R * V * 2 / ms / 1e9, 2),
                         "loss_err": loss_err, "grad_rel_err": grad_err})
    except Exception as error:  # a candidate that does not compile is a finding too
        one_read.append({"kernel": "one read", "warps": warps, "error": str(error)[:300]})
    print(json.dumps(one_read[-1]), flush=True)
print(f"copy of the chunk: {triton.testing.do_bench(lambda: work.copy_(logits), warmup=20, rep=100):.4f} ms")
