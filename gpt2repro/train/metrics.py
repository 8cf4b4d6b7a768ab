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
    log.jsonl and the Accelerate trackers. Other processes show and record nothing."""

    def __init__(self, run: RunDir | None, accelerator, total_steps: int, initial_step: int, enabled: bool,
                 bar: bool = True):
        self.run, self.accelerator, self.enabled = run, accelerator, enabled
        self.trackers = bool(accelerator.log_with)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                        leave=False, disable=not (enabled and bar and sys.stderr.isatty()))
        self.started = time.perf_counter()

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

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def close(self) -> None:
        self.bar.close()
