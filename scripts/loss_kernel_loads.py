"""Compile the loss kernel (gpt2repro/model/loss.py) for a GPU without one and count its global loads and stores by width.

    python scripts/loss_kernel_loads.py [--arch 90] [--vocab 50304] [--classes 50257] [--block 8192] [--warps 16]

The kernel reads a row of logits at a time and is bound by memory: its loads should be 16 bytes wide
(`ld.global.v4.b32`), not 2 (`ld.global.b16`). Triton decides the width from what it knows of the
pointers and the load mask, so the arguments get the specialization a training step's launch gives
them (pointers and integers that are multiples of 16 marked as such). Prints one JSON line per
variant (with and without the gradient) with the PTX instruction counts. Needs Triton, not a GPU.
"""

import argparse
import json
import re
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpt2repro.model.loss import _softmax_xent_kernel

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for Hopper")
parser.add_argument("--vocab", type=int, default=50304, help="columns per row of logits (the padded vocabulary)")
parser.add_argument("--classes", type=int, default=50257, help="columns the softmax spans")
parser.add_argument("--block", type=int, default=8192)
parser.add_argument("--warps", type=int, default=16)
args = parser.parse_args()

signature = {"logits_ptr": "*bf16", "targets_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32", "stride": "i32",
             "V": "i32", "classes": "i32", "ignore_index": "i32", "WRITE_GRAD": "constexpr", "BLOCK": "constexpr"}
values = {"stride": args.vocab, "V": args.vocab, "classes": args.classes, "ignore_index": -1}
names = list(signature)
aligned = names[:4] + [name for name, v in values.items() if v % 16 == 0]  # the four pointers, then integers
attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
for write_grad in (True, False):
    source = ASTSource(fn=_softmax_xent_kernel, signature=signature, attrs=attrs,
                       constexprs={"WRITE_GRAD": write_grad, "BLOCK": args.block})
    ptx = triton.compile(source, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": args.warps}).asm["ptx"]
    counts = Counter(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))
    print(json.dumps({"triton": triton.__version__, "arch": f"sm_{args.arch}", "vocab": args.vocab, "classes": args.classes,
                      "write_grad": write_grad, "instructions": dict(sorted(counts.items()))}))
