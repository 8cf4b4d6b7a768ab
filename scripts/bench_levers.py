"""Time `gpt2repro bench`'s training step (ours only) under speed levers, one JSON line per call.

    python scripts/bench_levers.py --lever LEVER[,LEVER...] [--steps 20] [--batch 64] [--profile FILE] [--memory FILE]

Levers of our own code are training-config settings (the same `--set` keys `train` and `bench` take):
default: the step as `train` runs it.
plain-loss: the loss through the full (B*T, V) logits (loss_chunk_rows=0), as before the chunked loss.
chunk-N: the chunked loss with N rows per chunk (loss_chunk_rows=N; the default is 8192).
sdpa: scaled_dot_product_attention even where flash-attn-4's kernels are installed (attention=sdpa).
save-gelu: the MLP keeps its GELU output for backward instead of recomputing it there (recompute_gelu=false).
model-compile: one graph for the whole model (compile_scope=model; the default compiles one Block graph,
    the embedding and the loss head).
blocks-only: the Block graph alone, the embedding and the loss head left eager (the default before).
fp32-residual: the residual stream in fp32 under bf16 autocast (bf16_residual=false; the default keeps it in
    bf16, as llm.c does).
checkpointing: every Block recomputed in backward (activation_checkpointing=true).
eager: the step launched kernel by kernel from the host (cuda_graph=false; the default replays it as one CUDA graph).
plain-mlp: the MLP as separate matmul and GELU kernels (fused_mlp=false; the default puts the GELU in quack's
    matmul epilogues where the [gpu] extra is installed).
add-after-mlp: each Block adds the MLP's output to the residual stream in a kernel of its own (fused_residual=false;
    the default has quack's MLP add the bf16 stream in its last matmul's epilogue).
plain-norm: the LayerNorm backward as the compiler writes it (fused_norm=false; the default runs quack's, with
    the residual stream's gradient added in, where the [gpu] extra is installed).
Levers of PyTorch's own settings:
flash / cudnn: scaled_dot_product_attention limited to FlashAttention-2 / cuDNN attention.
cdt: inductor's coordinate-descent tuning of its generated kernels.
tile-reductions: inductor's 2-D tiled reductions (LayerNorm and bias gradients).
cublaslt: cuBLASLt for every matmul (torch.backends.cuda.preferred_blas_library), not only those with a bias.
autotune: inductor's GEMM autotuning (cuBLAS against Triton templates, whose epilogues can take in
    the neighbouring bias, GELU and residual kernels), benchmarked in a subprocess.
--profile FILE: after timing, profile 3 steps and write GPU time per kernel and per kind of kernel.
--gemms FILE: after timing, profile 3 steps and write each matmul shape's GPU time and TFLOP/s.
--llmc FILE: the JSON lines of the llm.c anchor (../shared/tools/llmc-anchor/run.sh) run in the same call; adds
    llmc_tokens_per_sec (its fastest line at this batch, 124M) and ratio_vs_llmc to the result.
--trace FILE: after timing, write the Chrome trace (CPU and GPU) of 2 steps, to see what the host does while
    the GPU waits.
--memory FILE: after timing, write the peak memory of each phase of a step and the tensors alive at
    the step's peak, largest first, with the line of (generated) code that allocated them.
The loss kernel's launch settings are swept by scripts/bench_loss_kernel.py. Each lever needs a fresh
process (compilation settings are global), hence a script rather than a flag.
"""

import argparse
import json
import re
import time

import torch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--lever", default="default")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--profile", metavar="FILE")
parser.add_argument("--gemms", metavar="FILE")
parser.add_argument("--memory", metavar="FILE")
parser.add_argument("--trace", metavar="FILE")
parser.add_argument("--llmc", metavar="FILE")
args = parser.parse_args()

import torch._inductor.config as inductor  # noqa: E402

from gpt2repro.bench import bench_setup, run_bench, training_step  # noqa: E402

SETTINGS = {  # levers of our own code: training-config overrides
    "default": [], "plain-loss": ["loss_chunk_rows=0"], "sdpa": ["attention=sdpa"],
    "save-gelu": ["recompute_gelu=false"], "model-compile": ["compile_scope=model"],
    "checkpointing": ["activation_checkpointing=true"], "fp32-residual": ["bf16_residual=false"],
    "eager": ["cuda_graph=false"], "plain-mlp": ["fused_mlp=false"],
    "plain-norm": ["fused_norm=false"], "add-after-mlp": ["fused_residual=false"],
}


def apply(lever: str) -> list[str]:
    """Set a PyTorch-level lever, or return the config overrides of one of ours."""
    if lever in SETTINGS:
        return SETTINGS[lever]
    if lever.startswith("chunk-"):
        return [f"loss_chunk_rows={int(lever.removeprefix('chunk-'))}"]
    if lever == "flash":
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
    elif lever == "blocks-only":
        from gpt2repro.model.gpt import GPT

        def compile_blocks(self):
            for block in self.transformer.h:
                block.compile()

        GPT.compile_blocks = compile_blocks
    elif lever == "tile-reductions":
        inductor.triton.tile_reductions = True
    else:
        parser.error(f"unknown lever {lever!r}")
    return []


OVERRIDES = [item for lever in args.lever.split(",") for item in apply(lever)]


def kernel_kind(name: str) -> str:
    if re.search(r"flash|fmha|attention|sdpa|cudnn", name, re.I):
        return "attention"
    if "xent" in name:
        return "loss (softmax cross-entropy)"
    if re.search(r"rmsnorm", name, re.I):
        return "LayerNorm backward (quack)"
    if re.search(r"gemm|nvjet|cutlass|xmma|sm90_|_mm_|triton_tem", name):
        return "matmul"
    if re.search(r"adam|multi_tensor|foreach|norm_", name, re.I) and not name.startswith("triton"):
        return "optimizer and clipping"
    if name.startswith("triton"):
        return "inductor-generated (elementwise, norms, loss)"
    return "other"


def profiled_steps(steps: int = 3, **profiler_args) -> torch.profiler.profile:
    """A fresh step, 3 unprofiled steps of it, then the profile of `steps` more, each synchronised as the bench
    times it."""
    cfg, tokens = bench_setup(args.batch, overrides=OVERRIDES)
    _, step = training_step(cfg, tokens)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(**profiler_args) as prof:
        for _ in range(steps):
            step()
            torch.cuda.synchronize()
    return prof


def trace(path: str) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    profiled_steps(2, activities=activities).export_chrome_trace(path)


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

    cfg, tokens = bench_setup(args.batch, overrides=OVERRIDES + ["cuda_graph=false"])  # phase by phase
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
        loss = trainer.model(x, y)[1]

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
result = run_bench(args.batch, 1024, steps=args.steps, warmup=3, overrides=OVERRIDES)
result.update(lever=args.lever, wall_s=round(time.perf_counter() - start, 1))
if args.llmc:
    lines = [json.loads(line) for line in open(args.llmc) if line.startswith("{")]
    anchor = [line for line in lines if line["batch"] == args.batch and line["depth"] == 12]
    result["llmc_tokens_per_sec"] = max(line["tokens_per_sec"] for line in anchor)
    result["ratio_vs_llmc"] = round(result["ours_tokens_per_sec"] / result["llmc_tokens_per_sec"], 3)
print(json.dumps(result), flush=True)
if args.profile:
    profile(args.profile)
if args.gemms:
    gemms(args.gemms)
if args.memory:
    memory(args.memory)
if args.trace:
    trace(args.trace)
