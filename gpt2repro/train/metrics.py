"""Throughput and MFU, the console line, log.jsonl and the trackers.

MFU counts `GPTConfig.flops_per_token(seq_len)` training FLOPs per token, 6 * (matmul parameters) +
6 * n_layer * n_embd * seq_len (the second term is causal attention), against the GPU's dense bf16
peak. `gpt2repro bench` uses the same formula.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..run_dir import RunDir

# dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets); MFU is left out on other devices
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "L4": 121e12}
MFU_FORMULA = "tokens/s * (6*N_matmul + 6*n_layer*n_embd*seq) / peak bf16 FLOP/s"


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_sec: float, flops_per_token: int, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation of `devices` GPUs together, or None where the peak is unknown."""
    return tokens_per_sec * flops_per_token / (peak * devices) if peak else None


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """What the main process shows and records: a progress bar on a terminal (plain lines elsewhere),
    log.jsonl and the Accelerate trackers, and the step timing behind tokens/s, MFU and the ETA.
    Other processes show and record nothing."""

    def __init__(self, run: RunDir | None, accelerator, cfg: TrainConfig, initial_step: int, bar: bool = True):
        self.run, self.accelerator, self.cfg = run, accelerator, cfg
        self.enabled = accelerator.is_main_process
        self.trackers = bool(accelerator.log_with)
        self.device, self.world_size = accelerator.device, accelerator.num_processes
        self.peak_flops = peak_flops(self.device)
        self.flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
        self.bar = tqdm(total=cfg.max_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                        leave=False, disable=not (self.enabled and bar and sys.stderr.isatty()))
        self.started = time.perf_counter()
        self.timer_start, self.steps_timed, self.step_times = None, 0, []

    def restart_timer(self) -> None:
        """Start timing steps afresh (after evaluation, whose time is not step time)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timer_start, self.steps_timed = time.perf_counter(), 0

    def log_step(self, step: int, loss: float, grad_norm: float, lr: float, tokens_seen: int,
                 skipped_steps: int | None = None) -> None:
        """Record optimizer step `step` (0-based) with the mean time of the steps since the last record;
        `skipped_steps` when this step was skipped."""
        now = time.perf_counter()
        step_ms = 1000 * (now - self.timer_start) / self.steps_timed
        self.timer_start, self.steps_timed = now, 0
        self.step_times.append(step_ms)
        tokens_per_sec = self.cfg.total_batch_size / (step_ms / 1000)
        utilisation = mfu(tokens_per_sec, self.flops_per_token, self.peak_flops, self.world_size)
        record = {
            "step": step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm, "ms": step_ms,
            "tokens_per_sec": tokens_per_sec, "mfu": utilisation, "tokens": tokens_seen,
            "elapsed_s": self.elapsed(),  # wall time of this invocation so far, compilation and evaluation included
        }
        if self.device.type == "cuda":
            record["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30  # this process, since start
        if skipped_steps is not None:
            record["skipped"] = True
            record["skipped_steps"] = skipped_steps
        self.record(record)
        recent = sorted(self.step_times[-50:])
        eta = (self.cfg.max_steps - step - 1) * recent[len(recent) // 2] / 1000
        line = (f"step {step:6d} | loss {loss:.6f} | lr {lr:.4e} | norm {grad_norm:.4f} | "
                f"{step_ms:8.1f} ms | {tokens_per_sec:11,.0f} tok/s")
        if utilisation is not None:
            line += f" | MFU {100 * utilisation:.1f}% (6N+6LCT)"
        line += f" | ETA {format_duration(eta)}"
        if skipped_steps is not None:
            line += " | SKIPPED (non-finite gradients)"
        self.write(line)

    def log_results(self, step: int, results: dict) -> None:
        self.record({"step": step, **results})
        self.write(f"step {step:6d} | " + " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line) if not self.bar.disable else print(line, flush=True)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.run is not None:
            self.run.append_log(record)
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def advance(self) -> None:
        self.bar.update(1)
        self.steps_timed += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def close(self) -> None:
        self.bar.close()


def flat(d: dict, prefix: str = "") -> dict:
    """A nested config as one level of `a.b` keys with plain values, as trackers take it."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
