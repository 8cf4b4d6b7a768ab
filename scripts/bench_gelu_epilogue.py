"""Time one layer's MLP (c_fc, GELU, c_proj), forward and backward, with the GELU in matmul epilogues.

    python scripts/bench_gelu_epilogue.py [--tokens 65536] [--width 768]

The ways, on the same bf16 inputs and output gradient:
- `step`: the MLP as the plain training step runs it (fused_mlp=false), compiled, under bf16 autocast, with
  fp32 weights and the GELU recomputed in backward (`gpt2repro.model.gpt.MLP`);
- `quack`: the same module with the GELU in quack's matmul epilogues (fused_mlp=true, the default where the
  `[gpu]` extra is installed; `gpt2repro/model/fused_mlp.py`), also compiled; `first_call_s` includes
  quack's compilation and tuning of its kernels;
- `epilogue`: c_fc's matmul adds the bias and applies the GELU in cuBLASLt's epilogue and also writes the
  pre-activation (GELU_AUX_BIAS); in backward the matmul that makes c_proj's input gradient applies the
  GELU's derivative and sums c_fc's bias gradient in its epilogue (DGELU_BGRAD). cuBLASLt is reached
  through nvmath-python. `epilogue-save` keeps the GELU output for c_proj's weight gradient (more memory),
  `epilogue` recomputes it from the pre-activation, as the step does.

Prints one JSON line per way: median GPU ms of forward + backward (CUDA events, after warm-up), host ms per
call, and each output's relative L2 error against an fp32 computation. Needs CUDA; the cuBLASLt ways
need nvmath-python and are left out without it.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from gpt2repro.config import GPTConfig
from gpt2repro.model.gpt import MLP

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, default=65536)
parser.add_argument("--width", type=int, default=768)
parser.add_argument("--iters", type=int, default=30)
args = parser.parse_args()
N, C = args.tokens, args.width
bf16 = torch.bfloat16

torch.manual_seed(0)
mlp = MLP(GPTConfig(n_embd=C, n_head=C // 64), fused=False).cuda()
with torch.no_grad():
    mlp.c_fc.bias.normal_(0, 0.02)
    mlp.c_proj.bias.normal_(0, 0.02)
fused_mlp = MLP(GPTConfig(n_embd=C, n_head=C // 64), fused=True).cuda()
fused_mlp.load_state_dict(mlp.state_dict())
x = torch.randn(N, C, device="cuda").to(bf16)
dy = (1e-2 * torch.randn(N, C, device="cuda")).to(bf16)
params = dict(w_fc=mlp.c_fc.weight, b_fc=mlp.c_fc.bias, w_pr=mlp.c_proj.weight, b_pr=mlp.c_proj.bias)


def reference() -> dict:
    """fp32 forward and backward of the same function."""
    xr = x.float().requires_grad_()
    h = F.linear(xr, params["w_fc"], params["b_fc"])
    y = F.linear(F.gelu(h, approximate="tanh"), params["w_pr"], params["b_pr"])
    grads = torch.autograd.grad(y, [xr, *params.values()], dy.float())
    mlp.zero_grad(set_to_none=True)
    return dict(y=y.detach(), dx=grads[0], **{f"d{k}": g for k, g in zip(params, grads[1:])})


x_in = x.detach().requires_grad_()


def module_step(module: MLP):
    compiled = torch.compile(module)

    def step() -> dict:
        module.zero_grad(set_to_none=True)
        x_in.grad = None
        with torch.autocast("cuda", bf16):
            y = compiled(x_in)
        y.backward(dy)
        return dict(y=y, dx=x_in.grad, dw_fc=module.c_fc.weight.grad, db_fc=module.c_fc.bias.grad,
                    dw_pr=module.c_proj.weight.grad, db_pr=module.c_proj.bias.grad)

    return step


def epilogue_ways():
    """The cuBLASLt ways, through nvmath-python."""
    from nvmath.linalg.advanced import Matmul, MatmulEpilog

    # cuBLASLt computes column-major D (M, N) = A (M, K) @ B (K, N) with a bias of length M. With M = 4C
    # features and N = tokens, D is our row-major (tokens, 4C) activation, and the bias runs along features.
    w_fc, b_fc, w_pr = (params[k].to(bf16) for k in ("w_fc", "b_fc", "w_pr"))
    forward_mm = Matmul(w_fc, x.t())
    forward_mm.plan(epilog=MatmulEpilog.GELU_AUX_BIAS, epilog_inputs={"bias": b_fc})
    _, aux = forward_mm.execute()
    backward_mm = Matmul(w_pr.t(), dy.t())
    backward_mm.plan(epilog=MatmulEpilog.DGELU_BGRAD, epilog_inputs={"gelu_aux": aux["gelu_aux"]})

    def epilogue(save_gelu: bool) -> dict:
        w_fc, b_fc, w_pr, b_pr = (p.to(bf16) for p in params.values())  # the casts autocast does
        forward_mm.reset_operands(a=w_fc, b=x.t(), epilog_inputs={"bias": b_fc})
        act_t, aux = forward_mm.execute()  # GELU(W x + b), column-major (4C, N), and the pre-activation
        pre_t = aux["gelu_aux"]
        act = act_t.t()  # (N, 4C)
        y = torch.addmm(b_pr, act, w_pr.t())
        backward_mm.reset_operands(a=w_pr.t(), b=dy.t(), epilog_inputs={"gelu_aux": pre_t})
        dh_t, out = backward_mm.execute()  # d loss / d pre-activation, column-major (4C, N), and its column sums
        dh = dh_t.t()
        saved = act if save_gelu else F.gelu(pre_t.t(), approximate="tanh")
        return dict(y=y, dx=dh @ w_fc, dw_fc=(dh.t() @ x).float(), db_fc=out["dgelu_bgrad"].float(),
                    dw_pr=(dy.t() @ saved).float(), db_pr=dy.sum(0, dtype=torch.float32))

    return {"epilogue": lambda: epilogue(False), "epilogue-save": lambda: epilogue(True)}


def measure(name: str, fn) -> dict:
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
    gpu_ms, host_ms = [], []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t = time.perf_counter()
        out = fn()
        host_ms.append(1000 * (time.perf_counter() - t))
        end.record()
        torch.cuda.synchronize()
        gpu_ms.append(start.elapsed_time(end))
    errors = {k: round(((out[k].float() - ref[k]).norm() / ref[k].norm()).item(), 6) for k in ref}
    line = dict(way=name, tokens=N, width=C, gpu_ms=round(sorted(gpu_ms)[len(gpu_ms) // 2], 4),
                host_ms=round(sorted(host_ms)[len(host_ms) // 2], 4), first_call_s=round(first_call_s, 1),
                rel_l2_error=errors)
    print(json.dumps(line), flush=True)
    return line


ref = reference()
results = [measure("step", module_step(mlp))]
ways = {"quack": module_step(fused_mlp)}
try:
    ways.update(epilogue_ways())
except ImportError as error:
    print(json.dumps(dict(way="epilogue", error=f"not run: {error}")), flush=True)
for name, way in ways.items():
    try:
        results.append(measure(name, way))
    except Exception as error:  # a way that fails is a finding too
        print(json.dumps(dict(way=name, error=f"{type(error).__name__}: {error}"[:400])), flush=True)
step_ms = results[0]["gpu_ms"]
for r in results[1:]:
    print(f"{r['way']}: {step_ms - r['gpu_ms']:+.3f} ms per layer against the step's MLP")
