"""Time `gpt2repro bench`'s training step (ours only) under speed levers, one JSON line per call.

    python scripts/bench_levers.py --lever LEVER[,LEVER...] [--steps 20] [--batch 64] [--profile FILE] [--memory FILE]

default: the step as `train` runs it.
plain-loss: the loss through the full (B*T, V) logits, as before the chunked loss (loss.py).
chunk-N: the chunked loss with N rows per chunk (the default is loss.CHUNK_ROWS).
flash / cudnn: scaled_dot_product_attention limited to FlashAttention-2 / cuDNN attention.
sdpa: scaled_dot_product_attention even where flash-attn-4's kernels are installed (attention.py).
cdt: inductor's coordinate-descent tuning of its generated kernels.
save-gelu: the MLP keeps its GELU output for backward instead of recomputing it there.
cudagraphs: torch.compile(mode="reduce-overhead"), replaying each graph's kernels as a CUDA graph.
model-compile: compile_scope=model, one graph for the whole model (the default compiles one Block graph).
bf16-residual: the residual stream between blocks in bf16 instead of autocast's fp32.
compile-ends: with the Block graph, also compile the embeddings and the final LayerNorm.
compile-head: with the Block graph, also compile the training forward's two ends as functions: the
    embedding sum, and the final LayerNorm with the loss (its casts and gradient scaling).
nested-region: compile the whole model, each Block a nested compile region traced once.
tile-reductions: inductor's 2-D tiled reductions (LayerNorm and bias gradients).
xent-BLOCK-WARPS: the loss kernel with this block size and number of warps.
cublaslt: cuBLASLt for every matmul (torch.backends.cuda.preferred_blas_library), not only those with a bias.
autotune: inductor's GEMM autotuning (cuBLAS against Triton templates, whose epilogues can take in
    the neighbouring bias, GELU and residual kernels), benchmarked in a subprocess.
--profile FILE: after timing, profile 3 steps and write GPU time per kernel and per kind of kernel.
--gemms FILE: after timing, profile 3 steps and write each matmul shape's GPU time and TFLOP/s.
--memory FILE: after timing, write the peak memory of each phase of a step and the tensors alive at
    the step's peak, largest first, with the line of (generated) code that allocated them.
Each lever needs a fresh process (compilation settings are global), hence a script rather than a flag.
"""

import argparse
import dataclasses
import json
import re
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--lever", default="default")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--profile", metavar="FILE")
parser.add_argument("--gemms", metavar="FILE")
parser.add_argument("--memory", metavar="FILE")
args = parser.parse_args()

import gpt2repro.attention  # noqa: E402
import gpt2repro.config  # noqa: E402
import gpt2repro.loss  # noqa: E402
import gpt2repro.model  # noqa: E402
import gpt2repro.train  # noqa: E402
import torch._inductor.config as inductor  # noqa: E402


def apply(lever: str) -> None:
    if lever == "plain-loss":
        gpt2repro.model.linear_cross_entropy = lambda x, w, targets, ignore_index: F.cross_entropy(
            F.linear(x, w).float(), targets, ignore_index=ignore_index)
    elif lever.startswith("chunk-"):
        gpt2repro.loss.CHUNK_ROWS = int(lever.removeprefix("chunk-"))
    elif lever == "sdpa":
        gpt2repro.attention.ENABLED = False
    elif lever == "flash":
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    elif lever == "cudnn":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    elif lever == "cdt":
        inductor.coordinate_descent_tuning = True
    elif lever == "cublaslt":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    elif lever == "autotune":
        inductor.max_autotune_gemm = True
        inductor.max_autotune_gemm_backends = "ATEN,TRITON"
        inductor.autotune_in_subproc = True
        inductor.triton.enable_persistent_tma_matmul = True
    elif lever == "save-gelu":
        gpt2repro.model.MLP.forward = lambda self, x: self.c_proj(self.act(self.c_fc(x)))
    elif lever == "model-compile":
        preset = gpt2repro.config.TRAIN_PRESETS["gpt2-124M"]
        gpt2repro.config.TRAIN_PRESETS["gpt2-124M"] = lambda: dataclasses.replace(preset(), compile_scope="model")
    elif lever == "bf16-residual":
        block_forward = gpt2repro.model.Block.forward
        gpt2repro.model.Block.forward = lambda self, x, kv_cache=None: block_forward(self, x.to(torch.bfloat16), kv_cache)
    elif lever == "compile-ends":
        trainer_init = gpt2repro.train.Trainer.__init__

        def init(self, *a, **kw):
            trainer_init(self, *a, **kw)
            for module in (self.raw_model.transformer.wte, self.raw_model.transformer.wpe, self.raw_model.transformer.ln_f):
                module.compile()

        gpt2repro.train.Trainer.__init__ = init
    elif lever == "compile-head":
        gpt_forward = gpt2repro.model.GPT.forward

        @torch.compile(fullgraph=True)
        def embed(model, idx):
            pos = torch.arange(idx.size(1), device=idx.device)
            return model.transformer.wte(idx) + model.transformer.wpe(pos)

        @torch.compile(fullgraph=True)
        def head(model, x, targets):
            x = model.transformer.ln_f(x)
            return gpt2repro.model.linear_cross_entropy(x.view(-1, x.size(-1)), model.lm_head.weight, targets.reshape(-1), -1)

        def forward(self, idx, targets=None, kv_cache=None, return_logits=None):
            if targets is None or kv_cache is not None or return_logits:
                return gpt_forward(self, idx, targets, kv_cache, return_logits)
            x = embed(self, idx)
            for block in self.transformer.h:
                x = block(x)
            return None, head(self, x, targets)

        gpt2repro.model.GPT.forward = forward
    elif lever == "nested-region":
        gpt2repro.model.Block.forward = torch.compiler.nested_compile_region(gpt2repro.model.Block.forward)
        apply("model-compile")
    elif lever == "tile-reductions":
        inductor.triton.tile_reductions = True
    elif lever.startswith("xent-"):
        gpt2repro.loss.XENT_BLOCK, gpt2repro.loss.XENT_WARPS = map(int, lever.split("-")[1:])
    elif lever == "cudagraphs":
        _compile = torch.compile
        torch.compile = lambda model, **kwargs: _compile(model, mode="reduce-overhead", **kwargs)
    elif lever != "default":
        parser.error(f"unknown lever {lever!r}")


for lever in args.lever.split(","):
    apply(lever)

from gpt2repro.bench import bench_setup, run_bench, training_step  # noqa: E402


def kernel_kind(name: str) -> str:
    if re.search(r"flash|fmha|attention|sdpa|cudnn", name, re.I):
        return "attention"
    if "xent" in name:
        return "loss (softmax cross-entropy)"
    if re.search(r"gemm|nvjet|cutlass|xmma|sm90_|_mm_|triton_tem", name):
        return "matmul"
    if re.search(r"adam|multi_tensor|foreach|norm_", name, re.I) and not name.startswith("triton"):
        return "optimizer and clipping"
    if name.startswith("triton"):
        return "inductor-generated (elementwise, norms, loss)"
    return "other"


def profiled_steps(**profiler_args) -> torch.profiler.profile:
    """A fresh step, 3 unprofiled steps of it, then the profile of 3 more, each synchronised as the bench times it."""
    cfg, tokens = bench_setup(args.batch)
    _, step = training_step(cfg, tokens)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(**profiler_args) as prof:
        for _ in range(3):
            step()
            torch.cuda.synchronize()
    return prof


def profile(path: str) -> None:
    prof = profiled_steps(activities=[torch.profiler.ProfilerActivity.CUDA])
    rows = [(e.key, e.self_device_time_total / 3 / 1000, e.count // 3) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    # where the GPU waits: idle gaps between consecutive kernels, by the kernel that follows them
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps: dict[str, list[float]] = {}
    for (_, end, _), (start, _, name) in zip(kernels, kernels[1:]):
        if start - end > 20:  # microseconds
            g = gaps.setdefault(name[:100], [0.0, 0])
            g[0] += (start - end) / 3 / 1000
            g[1] += 1
    span = (kernels[-1][1] - kernels[0][0]) / 3 / 1000
    rows.sort(key=lambda r: -r[1])
    total = sum(ms for _, ms, _ in rows)
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    with open(path, "w") as f:
        f.write(f"GPU time per step: {total:.1f} ms ({args.lever})\n\n")
        for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
            f.write(f"{ms:8.2f} ms {100 * ms / total:5.1f}%  {kind}\n")
        f.write(f"\nfirst to last kernel: {span:.1f} ms per step; idle gaps over 20 us (ms per step, "
                "count in the 3 steps) before:\n")
        for name, (ms, count) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:12]:
            f.write(f"{ms:8.2f} ms {count:4d}x  {name}\n")
        f.write("\n   ms/step  calls  kernel\n")
        for name, ms, calls in rows[:60]:
            f.write(f"{ms:10.3f} {calls:6d}  {name[:160]}\n")
    print(open(path).read())


def gemms(path: str) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    prof = profiled_steps(activities=activities, record_shapes=True)
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "aten::addmm") or not e.device_time_total:
            continue
        a, b = e.input_shapes[1:3] if e.key == "aten::addmm" else e.input_shapes[:2]
        (m, k), n = a, b[1]
        ms = e.device_time_total / 3 / 1000
        rows.append((ms, e.key, m, n, k, e.count // 3, 2 * m * n * k * (e.count // 3) / ms / 1e9))
    rows.sort(reverse=True)
    total_ms = sum(r[0] for r in rows)
    tflops = sum(r[0] * r[6] for r in rows) / total_ms  # time-weighted mean: total FLOPs over total time
    with open(path, "w") as f:
        f.write(f"matmuls per step: {total_ms:.2f} ms, {tflops:.0f} TFLOP/s ({args.lever})\n\n")
        f.write("     ms/step  TFLOP/s  calls  op           M x N x K\n")
        for ms, key, m, n, k, calls, rate in rows:
            f.write(f"{ms:12.3f} {rate:8.1f} {calls:6d}  {key:12s} {m} x {n} x {k}\n")
    print(open(path).read())


def memory(path: str) -> None:
    import linecache

    cfg, tokens = bench_setup(args.batch)
    trainer, step = training_step(cfg, tokens)
    x, y = (t.to(trainer.device) for t in (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    gib = 2**30
    lines = [f"peak of the timed run, compilation included: {torch.cuda.max_memory_allocated() / gib:.2f} GiB"]
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    lines.append(f"allocated between steps: {torch.cuda.memory_allocated() / gib:.2f} GiB")
    loss = None

    def forward():
        nonlocal loss
        loss = trainer.forward(x, y)[1]

    phases = {
        "forward": forward,
        "backward": lambda: trainer.accelerator.backward(loss),
        "clip + optimizer": trainer.apply_update,
    }
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    for name, phase in phases.items():
        torch.cuda.reset_peak_memory_stats()
        phase()
        torch.cuda.synchronize()
        lines.append(f"{name:>16}: peak {torch.cuda.max_memory_allocated() / gib:6.2f} GiB, "
                     f"after {torch.cuda.memory_allocated() / gib:6.2f} GiB")
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    # replay the allocation trace to find the tensors alive at the peak
    live, total, best, at_peak = {}, 0, -1, {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > best:
            best, at_peak = total, dict(live)

    def origin(event) -> str:
        for frame in event.get("frames", []):
            if frame["filename"].endswith(".py") and "/torch/" not in frame["filename"]:
                code = linecache.getline(frame["filename"], frame["line"]).strip()
                return f"{frame['filename'].rsplit('/', 1)[-1]}:{frame['line']} {code[:110]}"
        return "(no Python frame)"

    groups: dict[str, list[int]] = {}
    for event in at_peak.values():
        g = groups.setdefault(origin(event), [0, 0])
        g[0] += event["size"]
        g[1] += 1
    lines.append(f"\nallocated during the traced step and alive at its peak: {best / gib:.2f} GiB "
                 "(on top of what the step started with)")
    for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"{size / gib:8.3f} GiB {count:5d}x  {where}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(open(path).read())


start = time.perf_counter()
result = run_bench(args.batch, 1024, steps=args.steps, warmup=3)
result.update(lever=args.lever, wall_s=round(time.perf_counter() - start, 1))
print(json.dumps(result), flush=True)
if args.profile:
    profile(args.profile)
if args.gemms:
    gemms(args.gemms)
if args.memory:
    memory(args.memory)
