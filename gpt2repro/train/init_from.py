"""`init_from`: the weights a new run starts from.

"scratch" (the default) is GPT-2's random initialisation. Anything else is a model the command
line accepts: a Hub id or local directory of a transformers GPT-2 (e.g. `gpt2`, `gpt2-medium`), or
our checkpoint, run directory or export. Its shape replaces the config's model shape, its
vocabulary is padded with zero rows to the config's `model.vocab_size` (the padded rows are never
predicted: the loss's softmax spans GPT-2's 50,257 tokens), and the step counter, optimizer state
and data position start fresh. A run that resumes from its own checkpoint keeps that checkpoint's
shape and never loads the source again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoint import read_model_config
from ..config import TrainConfig
from ..errors import UserError

VOCAB_TENSORS = ("transformer.wte.weight", "lm_head.weight")


def start_from(cfg: TrainConfig, checkpoint: Path | None) -> tuple[TrainConfig, dict[str, torch.Tensor] | None, str | None]:
    """(cfg with the run's model shape, the weights to load before training or None, the Hub id of the
    base model or None). `checkpoint` is the one the run resumes from, if any."""
    if cfg.init_from == "scratch":
        return cfg, None, None
    if checkpoint is not None:
        return _with_shape(cfg, read_model_config(checkpoint)), None, None
    from ..hf import load_model  # transformers is imported only for Hugging Face sources

    source = load_model(cfg.init_from)
    shape = source.config
    if shape.vocab_size > cfg.model.vocab_size:
        raise UserError(f"init_from {cfg.init_from} has a vocabulary of {shape.vocab_size}, more than "
                        f"model.vocab_size {cfg.model.vocab_size}")
    run_shape = dataclasses.replace(shape, vocab_size=cfg.model.vocab_size)
    weights = {}
    for name, tensor in source.state_dict().items():
        if name in VOCAB_TENSORS and tensor.size(0) < run_shape.vocab_size:
            tensor = torch.cat([tensor, tensor.new_zeros(run_shape.vocab_size - tensor.size(0), tensor.size(1))])
        weights[name] = tensor
    from_hub = not Path(cfg.init_from).expanduser().exists()  # load_model took it as a Hub id
    return _with_shape(cfg, run_shape), weights, cfg.init_from if from_hub else None


def _with_shape(cfg: TrainConfig, shape) -> TrainConfig:
    if cfg.seq_len > shape.block_size:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the context of init_from {cfg.init_from} ({shape.block_size} "
                        "tokens); set seq_len to at most that")
    return dataclasses.replace(cfg, model=shape)
