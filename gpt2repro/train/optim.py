"""The optimiser: AdamW with weight decay on 2-D tensors only, and the learning rate schedule."""

from __future__ import annotations

import logging
import math

import torch

from ..config import TrainConfig

logger = logging.getLogger("gpt2repro")


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr over warmup_steps, cosine decay to min_lr at max_steps, min_lr after."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def decay_groups(named_parameters) -> tuple[list[str], list[str]]:
    """Names of the parameters that get weight decay (2-D and up: matmul weights, embeddings) and that don't."""
    decay, no_decay = [], []
    for name, p in named_parameters:  # a tied parameter appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def build_optimizer(named_parameters, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over two groups (decayed, not decayed), the fused CUDA kernel when every parameter is on
    a GPU; and the parameter names in the optimizer's index order (decayed first), which checkpoints
    use to key the optimizer state."""
    params = dict(named_parameters)
    decay, no_decay = decay_groups(params.items())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    logger.info(
        "optimizer: %d decayed tensors (%s parameters), %d non-decayed tensors (%s parameters)",
        len(decay), f"{sum(params[n].numel() for n in decay):,}",
        len(no_decay), f"{sum(params[n].numel() for n in no_decay):,}",
    )
    fused = all(p.is_cuda for p in params.values())
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused), decay + no_decay
