"""Time `gpt2repro bench`'s training step (ours only) under one speed lever, one JSON line per call.

    python scripts/bench_levers.py --lever default|flash|cudnn|cdt|autotune [--steps 20]

flash / cudnn: scaled_dot_product_attention limited to FlashAttention-2 / cuDNN attention;
cdt: inductor's coordinate-descent tuning of its generated kernels;
autotune: torch.compile(mode="max-autotune-no-cudagraphs"), Triton matmul templates with fused epilogues.
Each lever needs a fresh process (compilation settings are global), hence a script rather than a flag.
"""

import argparse
import json
import time

import torch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--lever", default="default", choices=["default", "flash", "cudnn", "cdt", "autotune"])
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

if args.lever == "flash":
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
elif args.lever == "cudnn":
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
elif args.lever == "cdt":
    import torch._inductor.config

    torch._inductor.config.coordinate_descent_tuning = True
elif args.lever == "autotune":
    compile_default = torch.compile
    torch.compile = lambda model, **kwargs: compile_default(model, mode="max-autotune-no-cudagraphs", **kwargs)

from gpt2repro.bench import run_bench  # noqa: E402  (after the settings above)

start = time.perf_counter()
result = run_bench(64, 1024, steps=args.steps, warmup=3)
result.update(lever=args.lever, wall_s=round(time.perf_counter() - start, 1))
print(json.dumps(result))
