"""Training-step throughput: our step (the one `train` runs) and Hugging Face's GPT2LMHeadModel, side by side.

Both run in one process on the same GPU and the same random tokens: forward, backward, gradient
clipping and a fused AdamW step, bf16 autocast, TF32, torch.compile. MFU counts
6 * (matmul parameters) + 6 * n_layer * n_embd * seq_len FLOPs per token (GPTConfig.flops_per_token)
against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from typing import Callable

import torch

from .config import MODEL_PRESETS, TrainConfig, apply_overrides, parse_set
from .errors import UserError
from .eval.device import autocast
from .model.attention import backend as attention_backend
from .model.fused_mlp import backend as mlp_backend
from .model.fused_norm import backend as norm_backend
from .presets import TRAIN_PRESETS
from .train import Trainer, build_optimizer
from .train.launch import resolve_mixed_precision
from .train.metrics import MFU_FORMULA, mfu, peak_flops


CPU_TOKENS = 4096  # largest step bench runs on a CPU: the 124M model's activations grow with it


def _time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, list[float]]:
    """Seconds of the first step (compilation happens there) and per-step wall times in ms after
    `warmup` untimed steps, the first included."""

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first_step_s = timed()
    for _ in range(warmup - 1):
        step()
    return first_step_s, [1000 * timed() for _ in range(steps)]


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()


def training_step(cfg: TrainConfig, tokens: torch.Tensor) -> tuple[Trainer, Callable[[], None]]:
    """A Trainer without data and a function taking one optimizer step of it on `tokens`."""
    trainer = Trainer(cfg, data_dir=None, run_dir=None)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        trainer.take_step([(x, y)])
        trainer.step += 1

    return trainer, step


def bench_ours(cfg: TrainConfig, tokens: torch.Tensor, warmup: int, steps: int) -> dict:
    trainer, step = training_step(cfg, tokens)
    first_step_s, times = _time_steps(step, warmup, steps, trainer.device)
    result = {"ms": times, "first_step_s": first_step_s, "peak_gib": _peak_gib(trainer.device), "device": trainer.device,
              "distributed": trainer.accelerator.distributed_type.value,
              "step": trainer.step_mode}
    del trainer
    return result


def bench_hf(cfg: TrainConfig, tokens: torch.Tensor, warmup: int, steps: int, device: torch.device) -> dict:
    from transformers import GPT2LMHeadModel

    from .hf.convert import config_to_hf

    hf_config = config_to_hf(cfg.model)  # GPT-2's own 50,257-token vocabulary, as people train HF's model
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(hf_config).to(device).train()
    optimizer, _ = build_optimizer(model.named_parameters(), cfg.weight_decay, cfg.max_lr,
                                   betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    compiled = torch.compile(model) if cfg.compile else model
    x = tokens[:, :-1].contiguous().to(device)
    dtype = torch.bfloat16 if cfg.mixed_precision in ("bf16", "auto") and device.type == "cuda" else None

    def step():
        with autocast(device, dtype):
            loss = compiled(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first_step_s, times = _time_steps(step, warmup, steps, device)
    result = {"ms": times, "first_step_s": first_step_s, "peak_gib": _peak_gib(device)}
    del model, optimizer, compiled
    return result


def bench_setup(batch: int = 64, seq: int = 1024, preset: str = "gpt2-124M", model: str | None = None,
                overrides: list[str] = ()) -> tuple[TrainConfig, torch.Tensor]:
    """The training config of one (batch x seq) micro-step with no accumulation, and its random tokens.
    `overrides` are `--set KEY=VALUE` items (speed levers such as attention=sdpa, loss_chunk_rows=N,
    recompute_gelu=false, compile_scope=model, activation_checkpointing=true)."""
    cfg: TrainConfig = TRAIN_PRESETS[preset]()
    if model is not None:
        if model not in MODEL_PRESETS:
            raise UserError(f"unknown model {model!r}; known: {', '.join(MODEL_PRESETS)}")
        cfg.model = dataclasses.replace(MODEL_PRESETS[model])
    apply_overrides(cfg, parse_set(list(overrides)))
    cfg.micro_batch_size, cfg.seq_len, cfg.total_batch_size = batch, seq, batch * seq
    cfg.model.block_size = max(cfg.model.block_size, seq)
    cfg.hellaswag = None
    if not torch.cuda.is_available():
        cfg.compile, cfg.mixed_precision = False, "no"
    cfg.validate()
    generator = torch.Generator().manual_seed(0)
    return cfg, torch.randint(0, 50257, (batch, seq + 1), generator=generator)


def run_bench(batch: int = 64, seq: int = 1024, steps: int = 20, warmup: int = 5, compare_hf: bool = False,
              preset: str = "gpt2-124M", model: str | None = None, overrides: list[str] = ()) -> dict:
    cfg, tokens = bench_setup(batch, seq, preset, model, overrides)

    ours = bench_ours(cfg, tokens, warmup, steps)
    device, distributed, step = ours.pop("device"), ours.pop("distributed"), ours.pop("step")
    precision = resolve_mixed_precision(cfg.mixed_precision)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "compile": cfg.compile,
        "mixed_precision": cfg.mixed_precision,
        "distributed": distributed,  # NO, or FSDP under accelerate launch --config_file accelerate_configs/fsdp.yaml
        "model": f"{cfg.model.n_layer} layers x {cfg.model.n_embd}",
        "settings": list(overrides),
        "attention": attention_backend(device, precision, cfg.attention),
        "mlp": mlp_backend(device, precision, cfg.fused_mlp, cfg.fused_residual and cfg.bf16_residual),
        "layer_norm_backward": norm_backend(device, precision, cfg.fused_norm, cfg.bf16_residual),
        "step": step,  # ours: one CUDA graph per step, or eager and why
        "mfu_formula": MFU_FORMULA,
    }
    peak = peak_flops(device)
    flops_per_token = cfg.model.flops_per_token(seq)

    def summarize(name: str, measured: dict) -> None:
        ms = sorted(measured["ms"])[len(measured["ms"]) // 2]
        tokens_per_sec = batch * seq / (ms / 1000)
        result[f"{name}_ms_per_step"] = round(ms, 2)
        result[f"{name}_tokens_per_sec"] = round(tokens_per_sec)
        utilisation = mfu(tokens_per_sec, flops_per_token, peak)
        result[f"{name}_mfu"] = round(utilisation, 4) if utilisation is not None else None
        result[f"{name}_peak_gib"] = round(measured["peak_gib"], 2) if measured["peak_gib"] is not None else None
        result[f"{name}_first_step_s"] = round(measured["first_step_s"], 1)  # compilation included

    summarize("ours", ours)
    if compare_hf:
        _reset(device)
        summarize("hf", bench_hf(cfg, tokens, warmup, steps, device))
        result["ratio_vs_hf"] = round(result["ours_tokens_per_sec"] / result["hf_tokens_per_sec"], 3)
        if result["ours_peak_gib"] and result["hf_peak_gib"]:
            result["memory_ratio_vs_hf"] = round(result["ours_peak_gib"] / result["hf_peak_gib"], 3)
    return result


def print_table(result: dict) -> None:
    print(f"device {result['device']} | torch {result['torch']} (CUDA {result['cuda']}) | "
          f"B={result['batch']} T={result['seq']} | {result['mixed_precision']} | compile {result['compile']} | "
          f"attention {result['attention']} | MLP {result['mlp']} | step {result['step']}")
    print(f"{'':6} {'tokens/s':>12} {'ms/step':>9} {'MFU':>7} {'peak GiB':>9} {'first step s':>13}")
    for name in ("ours", "hf"):
        if f"{name}_tokens_per_sec" in result:
            mfu = result[f"{name}_mfu"]
            peak = result[f"{name}_peak_gib"]
            print(f"{name:6} {result[f'{name}_tokens_per_sec']:>12,} {result[f'{name}_ms_per_step']:>9.1f} "
                  f"{(f'{100 * mfu:.1f}%' if mfu else '-'):>7} {(f'{peak:.1f}' if peak else '-'):>9} "
                  f"{result[f'{name}_first_step_s']:>13.1f}")
    if "ratio_vs_hf" in result:
        print(f"ours / hf: {result['ratio_vs_hf']:.3f}x tokens/s" +
              (f", {result['memory_ratio_vs_hf']:.3f}x peak memory" if "memory_ratio_vs_hf" in result else ""))
    print(f"MFU: {result['mfu_formula']}")


def main(args) -> None:
    if min(args.steps, args.warmup, args.batch, args.seq) < 1:
        raise UserError("--steps, --warmup, --batch and --seq must be positive")
    if not torch.cuda.is_available() and args.batch * args.seq > CPU_TOKENS:
        raise UserError(f"no CUDA GPU here: on the CPU, bench at most {CPU_TOKENS:,} tokens per step "
                        f"(e.g. --batch 4 --seq 256); {args.batch} x {args.seq} would need tens of GB of memory")
    settings = [item for group in args.set for item in group]
    result = run_bench(args.batch, args.seq, args.steps, args.warmup, args.compare == "hf", model=args.model,
                       overrides=settings)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
