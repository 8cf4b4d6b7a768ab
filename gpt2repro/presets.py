"""The training presets, and a run's config from a preset, a YAML file and `--set` overrides.

A run is described by a preset name, optionally a YAML file, and `--set key=value` overrides,
applied in that order (config.py owns the fields and their checks); the result is validated once,
with all problems reported together.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from .config import MODEL_PRESETS, GPTConfig, TrainConfig, apply_overrides, did_you_mean, parse_set
from .errors import UserError, first_line


def _tiny() -> TrainConfig:
    # The quickstart's run on a CPU: 4 layers of width 128 on 128-token windows, 280 steps of 8 windows,
    # about 4 minutes on 2 cores (README). Most of its compute is the 50,304-way output layer, so small
    # steps, many of them, learn fastest per second: by the end the samples are English words.
    return TrainConfig(
        model=GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
        total_batch_size=8 * 128,
        micro_batch_size=8,
        seq_len=128,
        max_lr=3e-3,
        min_lr=3e-4,
        warmup_steps=20,
        max_steps=280,
        compile=False,
        val_every=70,
        val_batches=8,
        hellaswag_every=0,
        sample_every=140,
        num_samples=2,
        checkpoint_every=140,
    )


def _small() -> TrainConfig:
    # The quickstart's run on a GPU: 6 layers of width 384 on 256-token windows, bf16 and compiled,
    # 600 steps of 32 windows (16 passes over tiny Shakespeare), under half a minute on an H200.
    return TrainConfig(
        model=GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
        total_batch_size=32 * 256,
        micro_batch_size=32,
        seq_len=256,
        max_lr=1e-3,
        min_lr=1e-4,
        warmup_steps=20,
        max_steps=600,
        val_every=100,
        val_batches=3,  # 3 x 32 windows of 257 tokens: the quickstart holds out 32,768
        hellaswag_every=0,
        sample_every=300,
        num_samples=2,
        checkpoint_every=300,
    )


def _gpt3_recipe(model: str, max_lr: float, total_batch_size: int, micro_batch_size: int) -> TrainConfig:
    """A GPT-2 shape trained with the GPT-3 paper's settings for the nearest size (its Table 2.1: peak
    learning rate and tokens per step), 375M tokens of linear warmup and a cosine to 10% of the peak
    over 10B tokens, like gpt2-124M. The micro batch fits an 80 GB GPU without activation checkpointing."""
    return TrainConfig(
        model=dataclasses.replace(MODEL_PRESETS[model]), total_batch_size=total_batch_size,
        micro_batch_size=micro_batch_size, max_lr=max_lr, min_lr=round(max_lr / 10, 12),
        warmup_steps=int(375e6 / total_batch_size), max_steps=int(10e9 / total_batch_size),
        mixed_precision="bf16", hellaswag="auto",
    )


TRAIN_PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {
    # Karpathy's GPT-2 (124M) reproduction: GPT-3 Small's optimisation on GPT-2's model, 10B tokens.
    "gpt2-124M": lambda: TrainConfig(mixed_precision="bf16", hellaswag="auto"),
    # Larger GPT-2 shapes on the same 10B tokens: GPT-3 Medium's, Large's and XL's settings
    "gpt2-350M": lambda: _gpt3_recipe("gpt2-medium", 3e-4, 2**19, 32),
    "gpt2-774M": lambda: _gpt3_recipe("gpt2-large", 2.5e-4, 2**19, 16),
    "gpt2-1558M": lambda: _gpt3_recipe("gpt2-xl", 2e-4, 2**20, 16),
    # The same with GPT-3's 2048-token context (same tokens per step).
    "gpt3-124M": lambda: TrainConfig(
        model=GPTConfig(block_size=2048), seq_len=2048, micro_batch_size=32, mixed_precision="bf16", hellaswag="auto"
    ),
    # 300 steps of the 124M recipe on the Gutenberg books, in file order, validated on 20 windows of 64 x 1024,
    # on data prepared with the validation books first:
    #   gpt2repro prepare --source gutenberg_val.jsonl.xz gutenberg_train.jsonl.xz --val-tokens 2366956 --out DIR
    "gutenberg-short": lambda: TrainConfig(
        mixed_precision="bf16", warmup_steps=30, max_steps=300, shuffle=False,
        val_every=50, val_batches=20, hellaswag_every=0, sample_every=0, checkpoint_every=0,
    ),
    "tiny": _tiny,
    "small": _small,
}


def describe_presets() -> str:
    """One line per preset: what it sets, for `train --help`."""
    default = TrainConfig().to_dict()
    lines = []
    for name, make in TRAIN_PRESETS.items():
        values = make().to_dict()
        changed = [f"{k}={v}" for k, v in values.items() if k != "model" and v != default[k]]
        m = values["model"]
        shape = f"{m['n_layer']} layers x {m['n_embd']}, context {m['block_size']}"
        lines.append(f"  {name}: {shape}; " + (" ".join(changed) or "the defaults"))
    return "\n".join(lines)


def load_train_config(preset: str, config_file: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Preset, then YAML file, then --set overrides; every problem is reported at once, in one line."""
    if preset not in TRAIN_PRESETS:
        hint = (f" ({preset} is a model shape: --set model={preset})" if preset in MODEL_PRESETS
                else did_you_mean(preset, TRAIN_PRESETS))
        raise UserError(f"unknown preset {preset!r}{hint}; known: {', '.join(TRAIN_PRESETS)}")
    cfg = TRAIN_PRESETS[preset]()
    problems = []
    for source in (_read_config_file(config_file) if config_file is not None else {}, parse_set(list(overrides))):
        try:
            apply_overrides(cfg, source)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("; ".join(problems))
    return cfg.validate()


def _read_config_file(config_file: str | Path) -> dict:
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {first_line(e, with_type=False)}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of config keys")
    return values
