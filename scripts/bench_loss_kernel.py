"""Time the loss kernel (gpt2repro/model/loss.py, `softmax_xent_`) on one chunk of logits for each block size and warp count.

    python scripts/bench_loss_kernel.py [--rows 8192] [--vocab 50304]

One JSON line per setting (ms from triton.testing.do_bench, the logits' read-read-write traffic in
TB/s, the summed loss's relative error and the gradient's largest error against fp32 PyTorch), then the fastest settings and the time of copying the
chunk once (one read and one write), for scale. Needs CUDA and Triton.
"""

import argparse
import json

import torch
import triton.testing

from gpt2repro.model.loss import softmax_xent_

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rows", type=int, default=8192)
parser.add_argument("--vocab", type=int, default=50304)
args = parser.parse_args()
R, V = args.rows, args.vocab

generator = torch.Generator(device="cuda").manual_seed(0)
logits = (3 * torch.randn(R, V, device="cuda", generator=generator)).to(torch.bfloat16)
targets = torch.randint(0, V, (R,), device="cuda", generator=generator)
scale = torch.tensor(1.0 / R, device="cuda")
full = logits.float()
ref_loss = torch.logsumexp(full, 1) - full.gather(1, targets[:, None])[:, 0]
ref_grad = torch.softmax(full, 1)
ref_grad[torch.arange(R, device="cuda"), targets] -= 1
ref_grad *= scale
del full

work, results = logits.clone(), []
for block in (2048, 4096, 8192, 16384):
    for warps in (4, 8, 16, 32):
        def run():
            return softmax_xent_(work, targets, -1, scale, block=block, warps=warps)

        work.copy_(logits)
        loss_err = abs(run().item() - ref_loss.sum().item()) / ref_loss.sum().item()
        grad_err = ((work.float() - ref_grad).abs().max() / ref_grad.abs().max()).item()
        ms = triton.testing.do_bench(run, warmup=20, rep=100)  # in place: timing does not depend on the values
        results.append({"block": block, "warps": warps, "ms": round(ms, 4), "tb_s": round(3 * R * V * 2 / ms / 1e9, 2),
                        "loss_err": loss_err, "grad_rel_err": grad_err})
        print(json.dumps(results[-1]), flush=True)
print("fastest:", json.dumps(sorted(results, key=lambda r: r["ms"])[:4]))
print(f"copy of the chunk: {triton.testing.do_bench(lambda: work.copy_(logits), warmup=20, rep=100):.4f} ms")
