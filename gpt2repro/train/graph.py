"""The training step as one CUDA graph: forward and backward over every micro-batch, clipping and AdamW,
captured once and then replayed with one launch per step.

Eagerly, the host launches some two thousand kernels per step and the GPU waits on it between some
of them: 2.5 ms of a 118.7 ms bench step (one micro-batch) of the 124M model at B=64 on an H200; the
`train` loop, which overlaps most of that across its micro-batches, gains 0.3% (BENCHMARKS.md). A
replay runs the same kernels on the same tensors with no host work between them, so it computes what
the eager step computes, up to the order of the atomic additions some backward kernels make anyway.

What a replay needs, and how it gets it:
- the same input tensors every step: each step's micro-batches are copied into static ones;
- the learning rate of the step: AdamW reads it from a device scalar, filled before each replay (the
  param groups keep the float, which checkpoints record);
- no host sync inside the step: only with `on_nonfinite="stop"`, which checks the logged loss and
  norm; "skip" decides each step on the host, so its steps stay eager;
- no host reads of the CUDA RNG state: only compiled and without activation checkpointing, since
  `torch.utils.checkpoint` run eagerly (the GELU's recomputation without compile, or whole Blocks)
  saves that state, which capture forbids (`graph_blocker` names what keeps a step eager);
- compiled kernels and optimizer state that exist before capture: the first `EAGER_STEPS` steps run
  eagerly (compilation, the lazily created AdamW state), on a side stream as capture asks.
Replays must be dropped when the optimizer state is replaced (`reset`, as `Trainer.load_state_dict`
does): the graph holds the addresses of the old tensors.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import TrainConfig

EAGER_STEPS = 2  # steps before capture: compilation in the first, AdamW's state created there too


def graph_blocker(cfg: TrainConfig, device: torch.device, world_size: int) -> str | None:
    """Why a training step cannot be one CUDA graph here (None: it can)."""
    if not cfg.cuda_graph:
        return "cuda_graph=false"
    if device.type != "cuda":
        return "not on a CUDA GPU"
    if world_size > 1:
        return "more than one process (gradients are all-reduced between kernels)"
    if cfg.on_nonfinite != "stop":
        return "on_nonfinite=skip decides each step on the host"
    if cfg.activation_checkpointing or not cfg.compile:
        # compiled, the GELU's recomputation is part of the Block's graph; eager, it is not
        return ("activation checkpointing" if cfg.activation_checkpointing else "compile=false") + \
            ": torch.utils.checkpoint reads the CUDA RNG state, which capture forbids"
    return None


class GraphedStep:
    """`run(batches, lr)` (a list of (x, y) micro-batches and the learning rate, a float or a device
    scalar) eagerly for the first EAGER_STEPS calls, then captured and replayed. Returns what `run`
    returns; after capture those are the same tensors every step, overwritten by the next one."""

    def __init__(self, run: Callable, optimizer: torch.optim.Optimizer, device: torch.device):
        self.run, self.optimizer, self.device = run, optimizer, device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def reset(self) -> None:
        """Drop the graph (its memory with it); the next steps run eagerly again, then capture anew."""
        self.graph, self.inputs, self.outputs, self.eager_steps = None, None, None, 0
        torch.cuda.empty_cache()

    def __call__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float):
        if self.graph is None and self.eager_steps < EAGER_STEPS:
            self.eager_steps += 1
            return self._on_side_stream(lambda: self.run(batches, lr))
        if self.graph is None:
            self._capture(batches)
        for (static_x, static_y), (x, y) in zip(self.inputs, batches, strict=True):
            static_x.copy_(x, non_blocking=True)
            static_y.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # what state_dict() reports; the graph reads self.lr
        self.graph.replay()
        return self.outputs

    def _on_side_stream(self, fn):
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            result = fn()
        main.wait_stream(side)
        return result

    def _capture(self, batches) -> None:
        self.inputs = [(x.to(self.device), y.to(self.device)) for x, y in batches]
        self.lr = torch.zeros((), device=self.device)
        groups = self.optimizer.param_groups
        capturable = [group["capturable"] for group in groups]
        for group in groups:
            group["capturable"] = True  # lets capture proceed; the fused AdamW kernel does not read it
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph gets a memory pool of its own
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.run(self.inputs, self.lr)
        for group, flag in zip(groups, capturable):
            group["capturable"] = flag  # checkpoints save it, and AdamW on a CPU refuses capturable=True
