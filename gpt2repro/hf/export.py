"""The export directory: a checkpoint -> a directory `transformers` loads as it is.

    HF_DIR/config.json generation_config.json model.safetensors     GPT2LMHeadModel
    HF_DIR/tokenizer.json tokenizer_config.json special_tokens_map.json vocab.json merges.txt
    HF_DIR/README.md                                                 the model card
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import GenerationConfig

from .. import io
from ..checkpoint import load_model, resolve_checkpoint
from ..config import EOT_TOKEN
from ..errors import UserError
from ..model import GPT
from ..run_dir import RunDir
from .card import model_card
from .convert import gpt_to_hf
from .tokenizer_files import write_tokenizer_files

HF_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "README.md",
)


def save_hf(
    model: GPT,
    out_dir: str | Path,
    train_config: dict | None = None,
    metrics: dict | None = None,
    model_name: str | None = None,
) -> Path:
    """Write a directory `transformers` loads as is: weights, config, generation config, tokenizer, card.

    Written into a temporary sibling and renamed, so a failure never leaves a half-written export.
    An existing out_dir is replaced only when it holds nothing but an earlier export's files: it
    could be a run, a checkpoint or a clone of a Hub repository, none of which may be deleted.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir} exists and is not a directory; choose another output directory")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in HF_FILES)
        if foreign:
            raise UserError(
                f"{out_dir} already holds files that are not part of an export ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose another output directory"
            )
    hf_model = gpt_to_hf(model)
    hf_model.generation_config = GenerationConfig(
        bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, pad_token_id=EOT_TOKEN, do_sample=True, top_k=50,
    )
    with io.atomic_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer_files(tmp, model_max_length=model.config.block_size)
        io.write_text(tmp / "README.md", model_card(model, train_config, metrics, model_name=model_name or out_dir.name))
    return out_dir


RUN_METRICS = ("val_loss", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n")


def export_checkpoint(checkpoint_or_run, out_dir) -> Path:
    """Write save_hf's directory for a checkpoint (or a run's newest), its card carrying the run's
    validation loss and HellaSwag scores as of the checkpoint's step and the training config."""
    checkpoint = resolve_checkpoint(checkpoint_or_run)
    model = load_model(checkpoint)
    state_path = checkpoint / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{state_path} is not valid JSON") from None
    step = state.get("step")
    metrics = {name: state[key] for name, key in (("step", "step"), ("tokens", "tokens_seen"))
               if isinstance(state.get(key), int)}
    if checkpoint.parent.name == "checkpoints":  # RUN/checkpoints/step_NNNNNN: the run's log is two levels up
        run = RunDir(checkpoint.parent.parent)
        metrics.update(run.metrics_at(step if isinstance(step, int) else None, RUN_METRICS))
    return save_hf(model, out_dir, train_config=state.get("config"), metrics=metrics or None)
