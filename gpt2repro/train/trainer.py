"""The training loop: one Accelerate loop for a laptop CPU, one GPU, many GPUs (DDP or FSDP2) and many machines.

    gpt2repro train --preset gpt2-124M --data DIR --out RUN
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m gpt2repro train ...

Mechanisms and their single owners:
- learning rate: `get_lr(step, cfg)` (optim.py), written into the param groups once per optimizer
  step (no scheduler goes through `accelerator.prepare`, where it would step once per process);
- loss scaling for accumulation: `accelerator.backward` (it divides by the accumulation steps);
- gradient sync: `accelerator.accumulate` (no all-reduce on accumulation micro-steps);
- data order: the TokenLoader (same global batch per step whatever the world size);
- the whole state as one dict: `Trainer.state_dict()` / `load_state_dict()` (state.py gathers and
  scatters FSDP shards); on disk: checkpoint.py;
- the step as one CUDA graph on a single GPU: GraphedStep (graph.py);
- when to save and stop: CheckpointPolicy (policy.py); evaluation and samples: EvalHooks (hooks.py);
  what is shown and logged: Progress (metrics.py).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from ..checkpoint import latest_checkpoint, load_checkpoint, resume_point, save_checkpoint
from ..config import TrainConfig
from ..data import TokenLoader, read_manifest, verify_in_background
from ..errors import UserError
from ..model import GPT
from ..model.attention import backend as attention_backend
from ..model.attention import precompile as precompile_attention
from ..model.fused_mlp import backend as mlp_backend
from ..model.fused_norm import backend as norm_backend
from ..run_dir import RunDir
from . import state as training_state
from .graph import EAGER_STEPS, GraphedStep, graph_blocker
from .hooks import EvalHooks
from .init_from import start_from
from .launch import is_fsdp, make_accelerator, use_cpu, world_size
from .metrics import Progress, flat, format_duration
from .optim import build_optimizer, get_lr
from .policy import CheckpointPolicy

logger = logging.getLogger("gpt2repro")

EXIT_STOPPED_EARLY = 75  # stopped before max_steps with a checkpoint saved: rerun the same command to resume


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
        self.run = RunDir(run_dir) if run_dir is not None else None
        self.grad_accum_steps = cfg.grad_accum_steps(world_size())  # refuses batch sizes that do not divide
        self.accelerator = acc = make_accelerator(cfg, self.grad_accum_steps, self.run.path if self.run else None)
        self.rank, self.world_size, self.device = acc.process_index, acc.num_processes, acc.device
        self.is_main = acc.is_main_process
        self.sharded = is_fsdp(acc)
        checkpoint = resume_point(self.run.checkpoints) if self.run is not None else None
        self.resumed_from = checkpoint
        # init_from: the source's model shape (every process reads it; Hub downloads share one cache safely)
        cfg, start_weights, self.base_model = start_from(cfg, checkpoint)
        self.cfg = cfg
        if acc.mixed_precision == "bf16" and cfg.attention == "auto":
            # flash-attn-4 (if installed) compiles its attention backward while the model is built and compiled
            precompile_attention(self.device, cfg.model.n_head, cfg.model.n_embd, cfg.seq_len)
        if cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.loader, self.data_source, self.data_check = None, None, None
        if data_dir is not None:
            self.data_source = read_manifest(data_dir)["source"]  # what the data was made from, for model cards
            if acc.is_local_main_process:  # every shard's sha256, in a thread, once per machine
                self.data_check = verify_in_background(data_dir, "train")
            self.loader = TokenLoader(
                data_dir, "train", cfg.micro_batch_size, cfg.seq_len, rank=self.rank, world_size=self.world_size,
                seed=cfg.seed, shuffle=cfg.shuffle, vocab_size=cfg.model.vocab_size,
            )
        self.hooks = EvalHooks(cfg, data_dir, acc)
        self.policy = CheckpointPolicy(cfg)
        self.hub = None
        if cfg.push_to_hub and self.is_main and self.run is not None:  # refused now if it could never work
            from ..hf.hub import BackgroundPush

            self.hub = BackgroundPush(cfg.push_to_hub, self.run.path, logger.warning)

        self.step = 0  # completed optimizer steps
        self.tokens_seen = 0
        self.skipped_steps = 0

        # the same seed on every process: identical initial weights without a broadcast
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model, attention=cfg.attention, loss_chunk_rows=cfg.loss_chunk_rows,
                    recompute_gelu=cfg.recompute_gelu, fused_mlp=cfg.fused_mlp, fused_norm=cfg.fused_norm,
                    fused_residual=cfg.fused_residual, activation_checkpointing=cfg.activation_checkpointing,
                    bf16_residual=cfg.bf16_residual)
        saved = load_checkpoint(checkpoint, cfg.model) if checkpoint is not None else None
        if saved is not None:
            model.load_weights(saved["model"], source=f"checkpoint {checkpoint}")  # before any sharding
        elif start_weights is not None:
            model.load_weights(start_weights, source=f"init_from {cfg.init_from}")
        model.to(self.device)
        optimizer, self.param_names = build_optimizer(
            model.named_parameters(), cfg.weight_decay, cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if saved is not None:
            self._load_training_state(saved, checkpoint)
        if cfg.compile and cfg.compile_scope == "block":
            self.unwrapped.compile_blocks()
        elif cfg.compile:
            # compile the prepared (DDP) module so its gradient buckets still overlap the backward pass
            self.model = torch.compile(self.model)
        self.graph_blocker = graph_blocker(cfg, self.device, self.world_size)
        self.graph = GraphedStep(self._eager_step, self.optimizer, self.device) if self.graph_blocker is None else None

    @property
    def step_mode(self) -> str:
        """How each training step runs, for the log and benchmark reports."""
        return f"one CUDA graph, captured after the first {EAGER_STEPS} steps" if self.graph \
            else f"eager ({self.graph_blocker})"

    @property
    def engine(self) -> torch.nn.Module:
        """The prepared (DDP or FSDP) module without a compile wrapper: what state dicts are taken from."""
        return getattr(self.model, "_orig_mod", self.model)

    @property
    def unwrapped(self) -> GPT:
        """The GPT module itself (under FSDP2, sharded in place), without DDP or compile wrappers."""
        return self.accelerator.unwrap_model(self.model)

    # -------------------------------------------------------------------------------------
    # state

    def state_dict(self) -> dict:
        """The whole training state: full model weights and optimizer state, data position, counters,
        the RNG state of every process and the config. Call on every process; under FSDP the tensors
        are gathered to the main process, and the other processes get a partial dict."""
        rng = gather_object([training_state.rng_state()])
        module = self.engine if self.sharded else self.unwrapped
        return {
            "model_config": self.cfg.model,
            "model": training_state.model_state(module, self.sharded),
            "optimizer": training_state.optimizer_state(self.engine, self.optimizer.optimizer, self.param_names,
                                                        self.sharded),
            "trainer": {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps,
                "world_size": self.world_size,
                "hardware": self._hardware(),
                "data": self.data_source,
                "base_model": self.base_model,
                "loader": self.loader.state_dict() if self.loader is not None else None,
                "rng": rng,
                "config": self.cfg.to_dict(),
            },
        }

    def _hardware(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU process"
        return f"{self.world_size} x {name}"

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() (e.g. one read by checkpoint.load_checkpoint) on every process."""
        training_state.load_model_state(self.engine if self.sharded else self.unwrapped, state["model"], self.sharded)
        self._load_training_state(state, "state dict")
        if self.graph is not None:
            self.graph.reset()  # the optimizer's state tensors were replaced

    def _load_training_state(self, state: dict, source) -> None:
        try:
            training_state.load_optimizer_state(self.engine, self.optimizer.optimizer, state["optimizer"], self.param_names,
                                                self.sharded)
        except (ValueError, KeyError, IndexError, RuntimeError) as e:
            raise UserError(f"{source} has optimizer state that does not fit this model: {e}") from None
        trainer = state["trainer"]
        self.step, self.tokens_seen = trainer["step"], trainer["tokens_seen"]
        self.skipped_steps = trainer.get("skipped_steps", 0)
        self.base_model = trainer.get("base_model")
        if self.loader is not None and trainer.get("loader") is not None:
            self.loader.load_state_dict(trainer["loader"])
        if len(trainer["rng"]) == self.world_size:
            training_state.set_rng_state(trainer["rng"][self.rank])
        changed = sorted(k for k, v in trainer["config"].items() if self.cfg.to_dict().get(k) != v)
        if changed and self.is_main:
            logger.warning("resuming with changed settings: %s", ", ".join(changed))

    def _check_data(self) -> None:
        """Before the first checkpoint: the shard check started at start-up must have passed on every
        machine (a SIGTERM save does not wait for a check still running)."""
        waiting = self.data_check is not None and not (self.policy.sigterm_received and not self.data_check.done())
        problem = None
        if waiting:
            try:
                self.data_check.result()
            except UserError as e:
                problem = str(e)
        problems = [p for p in gather_object([problem]) if p]
        if problems:
            raise UserError(f"{problems[0]}; nothing was saved")
        if waiting:
            self.data_check = None

    def save(self) -> Path | None:
        """Checkpoint the state after `self.step` optimizer steps (gathered on every process, written by
        the main one). Refuses to write non-finite weights or optimizer state, or to save training on
        data whose shards fail their sha256 check."""
        self._check_data()
        state = self.state_dict()
        path = None
        if self.is_main:
            tensors = list(state["model"].values())
            tensors += [v for s in state["optimizer"]["state"].values() for v in s.values()]
            if not training_state.all_finite(tensors):
                path = "nonfinite"
            else:
                path = save_checkpoint(self.run.checkpoints, self.step, state, keep=self.cfg.keep_checkpoints,
                                       pinned=tuple(self.cfg.pin_checkpoints))
        path = broadcast_object_list([path])[0]
        if path == "nonfinite":
            good = latest_checkpoint(self.run.checkpoints)
            raise UserError(f"the weights or optimizer state turned non-finite by step {self.step}; nothing was "
                            f"saved; last good checkpoint: {good or 'none'} (lower max_lr, or on_nonfinite=skip)")
        return path

    # -------------------------------------------------------------------------------------
    # one optimizer step, split in two so tests can inspect the accumulated gradients

    def accumulate_gradients(self, batches) -> torch.Tensor:
        """Forward/backward over this process's micro-batches; returns their mean loss (on device)."""
        loss_sum = torch.zeros((), device=self.device)
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            # autocast here too: Accelerate wraps a DDP model's forward in it, not an FSDP2 model's
            with self.accelerator.accumulate(self.model), self.accelerator.autocast():
                _, loss = self.model(x, y)
                loss_sum += loss.detach()
                self.accelerator.backward(loss)  # divides by grad_accum_steps
        return loss_sum / self.grad_accum_steps

    def apply_update(self, lr: float | torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """Clip, set the learning rate (this step's unless given; a device scalar in a CUDA graph), take the
        optimizer step; returns (grad norm, skipped)."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        skipped = False
        if self.cfg.on_nonfinite == "skip" and not torch.isfinite(grad_norm).item():
            skipped = True  # a non-finite norm means non-finite gradients: drop them, keep the weights
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = get_lr(self.step, self.cfg) if lr is None else lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def _eager_step(self, batches, lr) -> StepStats:
        loss = self.accumulate_gradients(batches)
        return StepStats(loss, *self.apply_update(lr))

    def take_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        """One optimizer step over this process's micro-batches, as a CUDA graph where one applies
        (graph.py), else eagerly. The stats' tensors may be overwritten by the next step."""
        return (self.graph or self._eager_step)(batches, get_lr(self.step, self.cfg))

    def train_step(self) -> StepStats:
        return self.take_step([self.loader.next_batch() for _ in range(self.grad_accum_steps)])

    # -------------------------------------------------------------------------------------
    # the loop

    def _evaluate(self, progress: Progress, final: bool = False) -> bool:
        """Evaluation and samples due at `self.step` (or all of them, after the last step); True if any ran."""
        results = self.hooks.evaluate(self.model, self.step, final)
        if results:
            progress.log_results(self.step, results)
        sampled = self.hooks.sample_due(self.step, final)
        if sampled:
            texts = self.hooks.sample(self.unwrapped)
            if self.is_main:
                self.run.append_samples(self.step, texts)
                for text in texts:
                    progress.write(text)
        return bool(results) or sampled

    def _describe(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        logger.info(
            "model: %s parameters (%d layers, %d heads, width %d, vocab %d)", f"{self.unwrapped.num_params():,}",
            cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.vocab_size,
        )
        logger.info(
            "batch: %s tokens/step = %d micro x %d tokens x %d processes x %d accumulation steps",
            f"{cfg.total_batch_size:,}", cfg.micro_batch_size, cfg.seq_len, self.world_size, self.grad_accum_steps,
        )
        precision = "off (fp32)" if acc.mixed_precision == "no" else acc.mixed_precision
        compiled = f"on ({cfg.compile_scope})" if cfg.compile else "off"
        logger.info("distributed: %s on %s; mixed precision %s; compile %s; activation checkpointing %s",
                    acc.distributed_type.value, self.device, precision, compiled,
                    "on" if cfg.activation_checkpointing else "off")
        logger.info("attention: %s", attention_backend(self.device, acc.mixed_precision, cfg.attention))
        logger.info("MLP: %s", mlp_backend(self.device, acc.mixed_precision, cfg.fused_mlp,
                                           cfg.fused_residual and cfg.bf16_residual))
        logger.info("LayerNorm backward: %s",
                    norm_backend(self.device, acc.mixed_precision, cfg.fused_norm, cfg.bf16_residual))
        logger.info("step: %s", self.step_mode)
        if self.resumed_from:
            logger.info("resumed from %s at step %d", self.resumed_from, self.step)
        elif cfg.init_from != "scratch":
            logger.info("weights from %s (init_from), whose shape is the model's; step, optimizer state and data order "
                        "start fresh", cfg.init_from)

    def fit(self) -> bool:
        """Train to max_steps or to a requested stop; True if max_steps was reached."""
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.run.create(cfg.to_dict())
            self.run.truncate_log(self.step)
            self._describe()
        if cfg.log_with:
            wandb = {"name": cfg.wandb_run_name or self.run.path.name, "tags": cfg.wandb_tags}
            acc.init_trackers(cfg.wandb_project, config=flat(cfg.to_dict()), init_kwargs={"wandb": wandb})
        restore_sigterm = self.policy.install_sigterm_handler()
        try:
            return self._loop(Progress(self.run, acc, cfg, self.step, bar=cfg.progress_bar))
        finally:
            restore_sigterm()

    def _loop(self, progress: Progress) -> bool:
        cfg, acc = self.cfg, self.accelerator
        steps_this_run, stopped, saved = 0, False, None
        progress.restart_timer()
        while self.step < cfg.max_steps:
            if self._evaluate(progress):
                progress.restart_timer()
            stats = self.train_step()
            self.step += 1
            steps_this_run += 1
            self.tokens_seen += cfg.total_batch_size
            self.skipped_steps += int(stats.skipped)
            progress.advance()
            save_due = self.policy.save_due(self.step, steps_this_run)
            sigterm = False
            if self.step % cfg.log_every == 0 or save_due:
                # the one host sync of a logged step: mean loss over micro-steps and processes, gradient
                # norm, and whether any process was asked to stop (so all of them stop together)
                flag = torch.tensor(float(self.policy.sigterm_received), device=self.device)
                totals = acc.reduce(torch.stack([stats.loss.float(), flag]), reduction="sum").tolist()
                loss, grad_norm, sigterm = totals[0] / self.world_size, stats.grad_norm.item(), totals[1] > 0
                progress.log_step(self.step - 1, loss, grad_norm, get_lr(self.step - 1, cfg), self.tokens_seen,
                                  self.skipped_steps if stats.skipped else None)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)) and cfg.on_nonfinite == "stop":
                    previous = latest_checkpoint(self.run.checkpoints)
                    raise UserError(
                        f"non-finite loss {loss} or grad norm {grad_norm} at step {self.step - 1}; stopped without "
                        f"saving; last good checkpoint: {previous or 'none'} (on_nonfinite=skip skips such steps)"
                    )
            stop = sigterm or self.policy.stop_after(steps_this_run)
            if save_due or stop:
                saved = self.save()
                progress.write(f"checkpoint: {saved}")
                if self.hub is not None and self.cfg.hub_strategy == "every_save" and self.step < cfg.max_steps:
                    self.hub.push(saved)
            if stop and self.step < cfg.max_steps:
                why = "SIGTERM" if sigterm else f"stop_after_steps={cfg.stop_after_steps}"
                progress.write(f"stopped after step {self.step} ({why}); rerun the same command to resume "
                               f"(exit status {EXIT_STOPPED_EARLY})")
                stopped = True
                break
        if not stopped and (steps_this_run or not self._final_evaluation_logged()):
            self._evaluate(progress, final=True)  # the weights the last checkpoint holds
        if self.hub is not None:
            if not stopped:
                # the checkpoint just written (a rerun of a finished run: the newest), with the final evaluation in its card
                self.hub.push(saved or latest_checkpoint(self.run.checkpoints))
            self.hub.finish()
        progress.close()
        for tracker in acc.trackers:  # not end_training(): train() ends the process group, once every process is here
            tracker.finish()
        if not stopped:
            progress.write(f"done: {self.step} steps in {format_duration(progress.elapsed())} "
                           f"(this invocation, evaluation included)")
        return not stopped

    def _final_evaluation_logged(self) -> bool:
        return self.run.log.is_file() and any(r["step"] == self.step and "train_loss" not in r
                                              for r in self.run.read_log())


def train(cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path) -> Trainer:
    """Train (or resume) a run; returns the Trainer (`trainer.finished`: whether max_steps was reached)."""
    state = PartialState(cpu=use_cpu())
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(message)s", stream=sys.stdout, force=True)
    trainer = Trainer(cfg, data_dir, run_dir)
    trainer.finished = trainer.fit()
    # a process that exits with its Gloo group alive can abort in the group's threads ("terminate called ...")
    state.wait_for_everyone()
    state.destroy_process_group()
    return trainer
