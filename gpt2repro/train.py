"""The training loop: one Accelerate loop for a laptop CPU, one GPU, many GPUs and many machines.

    gpt2repro train --preset gpt2-124M --data DIR --out RUN
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m gpt2repro train ...

Mechanisms and their single owners:
- learning rate: `get_lr(step, cfg)`, written into the param groups once per optimizer step
  (no scheduler goes through `accelerator.prepare`, where it would step once per process);
- loss scaling for accumulation: `accelerator.backward` (it divides by the accumulation steps);
- gradient sync: `accelerator.accumulate` (no all-reduce on accumulation micro-steps);
- data order: the TokenLoader (same global batch per step whatever the world size);
- state on disk: checkpoint.py (safetensors + JSON, atomic, validated).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, is_tensorboard_available, is_wandb_available, parse_flag_from_env
from tqdm.auto import tqdm

from . import attention
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .errors import UserError
from .model import GPT

logger = logging.getLogger("gpt2repro")

# trackers `log_with` may name, and how to tell that their package is installed
TRACKERS = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}

# dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets); MFU is left out on other devices
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "L4": 121e12}


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr over warmup_steps, cosine decay to min_lr at max_steps, min_lr after."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def resolve_mixed_precision(setting: str) -> str:
    """"auto": the launcher's choice if `accelerate launch` made one, else bf16 on a GPU that has it."""
    if setting != "auto":
        return setting
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def use_cpu() -> bool:
    """Train on the CPU: asked for by the launcher (`use_cpu: true`), or no GPU to train on.

    Decided before the first `PartialState`, which picks the process-group backend (gloo on CPU).
    """
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class StepStats:
    loss: torch.Tensor  # mean over this process's micro-steps (not yet reduced across processes)
    grad_norm: torch.Tensor
    skipped: bool = False


class Trainer:
    """Owns the model, optimizer, data position and run directory, and can save/restore all of it."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path | None, run_dir: str | Path | None):
        """data_dir=None and run_dir=None give a trainer without data or disk state, whose step can be fed
        batches directly (`accumulate_gradients` + `apply_update`), as the benchmark and tests do."""
        self.cfg = cfg
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        world_size = PartialState(cpu=use_cpu()).num_processes
        self.grad_accum_steps = cfg.grad_accum_steps(world_size)  # refuses batch sizes that do not divide
        trackers = None
        if cfg.log_with:
            if cfg.log_with in TRACKERS and not TRACKERS[cfg.log_with]():
                # Accelerate would only warn and log nowhere
                raise UserError(f"log_with={cfg.log_with} needs the {cfg.log_with} package: pip install {cfg.log_with}")
            trackers = "all" if cfg.log_with == "all" else [cfg.log_with]
        self.accelerator = Accelerator(
            gradient_accumulation_steps=self.grad_accum_steps,
            cpu=use_cpu(),
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
            log_with=trackers,
            project_dir=str(self.run_dir) if self.run_dir is not None else None,
        )
        acc = self.accelerator
        self.rank, self.world_size, self.device = acc.process_index, acc.num_processes, acc.device
        self.is_main = acc.is_main_process
        if acc.mixed_precision == "bf16":
            # flash-attn-4 (if installed) compiles its attention backward while the model is built and compiled
            attention.precompile(self.device, cfg.model.n_head, cfg.model.n_embd, cfg.seq_len)
        if cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # the same seed on every process: identical initial weights without a broadcast
        torch.manual_seed(cfg.seed)
        self.raw_model = GPT(cfg.model).to(self.device)
        self.optimizer = self.raw_model.configure_optimizers(
            cfg.weight_decay, cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
        )
        self.loader, self.val_batches, self.hellaswag = None, [], None
        if data_dir is not None:
            from .data import TokenLoader, validation_batches

            self.loader = TokenLoader(
                self.data_dir, "train", cfg.micro_batch_size, cfg.seq_len, rank=self.rank,
                world_size=self.world_size, seed=cfg.seed, shuffle=cfg.shuffle, vocab_size=cfg.model.vocab_size,
            )
            if cfg.val_every and cfg.val_batches:
                self.val_batches = validation_batches(
                    self.data_dir, cfg.micro_batch_size, cfg.seq_len, cfg.val_batches, rank=self.rank,
                    world_size=self.world_size, vocab_size=cfg.model.vocab_size,
                )
        if cfg.hellaswag and cfg.hellaswag_every:
            from .evaluation import load_hellaswag

            # rank 0 downloads first so the others find the cache filled
            with acc.main_process_first():
                self.hellaswag = load_hellaswag(cfg.hellaswag)

        self.step = 0  # completed optimizer steps
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.resumed_from = self._resume()

        self.model, self.optimizer = acc.prepare(self.raw_model, self.optimizer)
        self.forward = self.model
        if cfg.compile and cfg.compile_scope == "block":
            # the blocks share one graph: dynamo treats their weights as inputs, so it compiles once for all layers
            for block in self.raw_model.transformer.h:
                block.compile()
        elif cfg.compile:
            # compile the prepared (DDP) module so its gradient buckets still overlap the backward pass
            self.forward = torch.compile(self.model)
        self.peak_flops = peak_flops(self.device)
        self.flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
        self.sigterm_received = False  # set by the signal handler; acted on when all processes agree

    # -------------------------------------------------------------------------------------
    # state

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def _resume(self) -> Path | None:
        if self.run_dir is None:
            return None
        path = latest_checkpoint(self.checkpoint_root)
        if path is None:
            return None
        state = load_checkpoint(path, self.raw_model, self.optimizer)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.loader.load_state_dict(state["loader"])
        rng_states = state["rng"]
        if len(rng_states) == self.world_size:
            set_rng_state(rng_states[self.rank])
        changed = sorted(k for k, v in state["config"].items() if self.cfg.to_dict().get(k) != v)
        if changed and self.is_main:
            logger.warning("resuming with changed settings: %s", ", ".join(changed))
        return path

    def save(self) -> Path | None:
        """Checkpoint the state after `self.step` optimizer steps (written by the main process)."""
        rng = gather_object([rng_state()])
        path = None
        if self.is_main:
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps,
                "world_size": self.world_size,
                "loader": self.loader.state_dict(),
                "rng": rng,
                "config": self.cfg.to_dict(),
            }
            path = save_checkpoint(
                self.checkpoint_root, self.step, self.raw_model, self.optimizer.optimizer, state,
                keep=self.cfg.keep_checkpoints, pinned=tuple(self.cfg.pin_checkpoints),
            )
        self.accelerator.wait_for_everyone()
        return path

    # -------------------------------------------------------------------------------------
    # one optimizer step, split in two so tests can inspect the accumulated gradients

    def accumulate_gradients(self, batches) -> torch.Tensor:
        """Forward/backward over this process's micro-batches; returns their mean loss (on device)."""
        loss_sum = torch.zeros((), device=self.device)
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.accelerator.accumulate(self.model):
                _, loss = self.forward(x, y)
                loss_sum += loss.detach()
                self.accelerator.backward(loss)  # divides by grad_accum_steps
        return loss_sum / self.grad_accum_steps

    def apply_update(self) -> tuple[torch.Tensor, bool]:
        """Clip, set this step's learning rate, take the optimizer step; returns (grad norm, skipped)."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        skipped = False
        if self.cfg.on_nonfinite == "skip" and not torch.isfinite(grad_norm).item():
            skipped = True  # a non-finite norm means non-finite gradients: drop them, keep the weights
        else:
            lr = get_lr(self.step, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def train_step(self) -> StepStats:
        batches = (self.loader.next_batch() for _ in range(self.grad_accum_steps))
        loss = self.accumulate_gradients(batches)
        grad_norm, skipped = self.apply_update()
        return StepStats(loss, grad_norm, skipped)

    # -------------------------------------------------------------------------------------
    # evaluation and samples

    def _sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def evaluate(self) -> dict:
        from .evaluation import evaluate_hellaswag, validation_loss

        cfg, results = self.cfg, {}
        last = self.step == cfg.max_steps - 1
        if self.val_batches and (self.step % cfg.val_every == 0 or last):
            with torch.no_grad():
                results["val_loss"] = validation_loss(
                    lambda x, y: self.forward(x.to(self.device), y.to(self.device))[1],
                    self.val_batches, all_reduce=self._sum_across_processes,
                )
        if self.hellaswag and (self.step % cfg.hellaswag_every == 0 or last):
            with torch.no_grad(), self.accelerator.autocast(), torch.compiler.set_stance("force_eager"):
                scores = evaluate_hellaswag(
                    lambda idx: self.raw_model(idx)[0], self.hellaswag, self.device, rank=self.rank,
                    world_size=self.world_size, all_reduce=self._sum_across_processes, progress=False,
                    pad_to=cfg.model.block_size,
                )
            results.update({k: scores[k] for k in ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n")})
        return results

    def sample(self) -> list[str] | None:
        from .tokenizer import get_encoding

        enc = get_encoding()
        prompt = torch.tensor(enc.encode(self.cfg.sample_prompt), dtype=torch.long, device=self.device)
        idx = prompt.unsqueeze(0).repeat(self.cfg.num_samples, 1)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.rank)  # fixed per rank
        # eager: compiled blocks would recompile for every length the KV cache grows through
        with self.accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            out = self.raw_model.generate(idx, self.cfg.sample_max_new_tokens, top_k=50, generator=generator)
        texts = [f"rank {self.rank} sample {i}: {enc.decode(row.tolist())}" for i, row in enumerate(out)]
        gathered = gather_object(texts)
        return gathered if self.is_main else None

    # -------------------------------------------------------------------------------------
    # the loop

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.cfg.log_with:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _truncate_log(self) -> None:
        """On resume, drop records from steps the interrupted run did after its last checkpoint."""
        log = self.run_dir / "log.jsonl"
        if self.is_main and log.exists():
            keep = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] < self.step]
            log.write_text("".join(line + "\n" for line in keep))

    def _install_sigterm_handler(self) -> None:
        def request_stop(signum, frame):
            self.sigterm_received = True

        try:
            signal.signal(signal.SIGTERM, request_stop)
        except ValueError:  # not the main thread (e.g. inside a test harness)
            pass

    def _evaluate_and_sample(self, bar) -> bool:
        """Periodic validation, HellaSwag and samples before step `self.step`; True if anything ran."""
        cfg = self.cfg
        results = self.evaluate()
        if results:
            self._log({"step": self.step, **results})
            if self.is_main:
                bar.write(f"step {self.step:6d} | " + " | ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
        last = self.step == cfg.max_steps - 1
        sampled = bool(cfg.sample_every and cfg.num_samples and (self.step % cfg.sample_every == 0 or last))
        if sampled:
            texts = self.sample()
            if self.is_main:
                with open(self.run_dir / "samples.txt", "a") as f:
                    f.write("".join(f"step {self.step}: {t}\n" for t in texts))
                for text in texts:
                    bar.write(text)
        return bool(results) or sampled

    def _describe(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        logger.info(
            "model: %s parameters (%d layers, %d heads, width %d, vocab %d)", f"{self.raw_model.num_params():,}",
            cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.vocab_size,
        )
        logger.info(
            "batch: %s tokens/step = %d micro x %d tokens x %d processes x %d accumulation steps; %s on %s; compile %s",
            f"{cfg.total_batch_size:,}", cfg.micro_batch_size, cfg.seq_len, self.world_size, self.grad_accum_steps,
            acc.mixed_precision, self.device, f"on ({cfg.compile_scope})" if cfg.compile else "off",
        )
        logger.info("attention: %s", attention.backend(self.device, acc.mixed_precision))
        if self.resumed_from:
            logger.info("resumed from %s at step %d", self.resumed_from, self.step)

    def run(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
            self._truncate_log()
            self._describe()
        if cfg.log_with:
            acc.init_trackers(self.run_dir.name, config=_flat(cfg.to_dict()))
        self._install_sigterm_handler()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", disable=not self.is_main,
                   dynamic_ncols=True, leave=False)
        started = time.perf_counter()
        steps_this_run, step_times = 0, []
        timer_start, steps_timed = None, 0
        while self.step < cfg.max_steps:
            if self._evaluate_and_sample(bar) or timer_start is None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timer_start, steps_timed = time.perf_counter(), 0  # evaluation time is not step time

            stats = self.train_step()
            self.step += 1
            steps_this_run += 1
            steps_timed += 1
            self.tokens_seen += cfg.total_batch_size
            self.skipped_steps += int(stats.skipped)
            bar.update(1)
            save_due = (
                self.step == cfg.max_steps
                or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                or (cfg.stop_after_steps and steps_this_run >= cfg.stop_after_steps)
            )
            sigterm = False
            if self.step % cfg.log_every == 0 or save_due:
                # the one host sync of a logged step: mean loss over micro-steps and processes, gradient
                # norm, and whether any process was asked to stop (so all of them stop together)
                totals = self._sum_across_processes(
                    torch.stack([stats.loss.float(), torch.tensor(float(self.sigterm_received), device=self.device)])
                ).tolist()
                loss, grad_norm = totals[0] / self.world_size, stats.grad_norm.item()
                sigterm = totals[1] > 0
                now = time.perf_counter()
                step_ms = 1000 * (now - timer_start) / steps_timed
                timer_start, steps_timed = now, 0
                step_times.append(step_ms)
                self._log_step(bar, loss, grad_norm, step_ms, step_times, stats.skipped, now - started)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)) and cfg.on_nonfinite == "stop":
                    previous = latest_checkpoint(self.checkpoint_root)
                    raise UserError(
                        f"non-finite loss {loss} or grad norm {grad_norm} at step {self.step - 1}; stopped without "
                        f"saving; last good checkpoint: {previous or 'none'} (on_nonfinite=skip skips such steps)"
                    )
            stop = sigterm or bool(cfg.stop_after_steps and steps_this_run >= cfg.stop_after_steps)
            if save_due or stop:
                path = self.save()
                if self.is_main:
                    bar.write(f"checkpoint: {path}")
            if stop:
                if self.is_main and self.step < cfg.max_steps:
                    why = "SIGTERM" if sigterm else f"stop_after_steps={cfg.stop_after_steps}"
                    bar.write(f"stopped after step {self.step} ({why}); rerun the same command to resume")
                break
        bar.close()
        if cfg.log_with:
            acc.end_training()

    def _log_step(self, bar, loss: float, grad_norm: float, step_ms: float, step_times: list, skipped: bool,
                  elapsed: float) -> None:
        cfg = self.cfg
        tokens_per_sec = cfg.total_batch_size / (step_ms / 1000)
        mfu = None
        if self.peak_flops:
            mfu = tokens_per_sec * self.flops_per_token / (self.peak_flops * self.world_size)
        record = {
            "step": self.step - 1, "train_loss": loss, "lr": get_lr(self.step - 1, cfg), "grad_norm": grad_norm,
            "ms": step_ms, "tokens_per_sec": tokens_per_sec, "mfu": mfu, "tokens": self.tokens_seen,
            "elapsed_s": elapsed,  # wall time of this invocation so far, compilation and evaluation included
        }
        if skipped:
            record["skipped"] = True
            record["skipped_steps"] = self.skipped_steps
        self._log(record)
        if self.is_main:
            recent = sorted(step_times[-50:])
            eta = (cfg.max_steps - self.step) * recent[len(recent) // 2] / 1000
            line = (
                f"step {self.step - 1:6d} | loss {loss:.6f} | lr {record['lr']:.4e} | norm {grad_norm:.4f} | "
                f"{step_ms:8.1f} ms | {tokens_per_sec:11,.0f} tok/s"
            )
            if mfu is not None:
                line += f" | MFU {100 * mfu:.1f}% (6N+6LCT)"
            line += f" | ETA {_format_duration(eta)}"
            if skipped:
                line += " | SKIPPED (non-finite gradients)"
            bar.write(line)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path) -> Trainer:
    """Train (or resume) a run; returns the finished Trainer."""
    state = PartialState(cpu=use_cpu())
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(message)s", stream=sys.stdout, force=True)
    trainer = Trainer(cfg, data_dir, run_dir)
    trainer.run()
    return trainer
