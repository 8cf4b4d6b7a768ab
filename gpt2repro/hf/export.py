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
from ..eval.hellaswag import upgrade_hellaswag_record
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
    *,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    hardware: str | None = None,
    metric_steps: dict | None = None,
    training: dict | None = None,
    data: dict | None = None,
) -> Path:
    """Write a directory `transformers` loads as is: weights, config, generation config, tokenizer, card.

    Written into a temporary sibling and renamed, so a failure never leaves a half-written export.
    An existing out_dir is replaced only when it holds nothing but an earlier export's files: it
    could be a run, a checkpoint or a clone of a Hub repository, none of which may be deleted.
    The card's name defaults to out_dir's name; the other keywords are card.model_card's (hardware,
    e.g. "8 x NVIDIA H200", goes into `training`).
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
        training = {**(training or {}), **({"hardware": hardware} if hardware else {})}
        card = model_card(model, train_config, metrics, model_name=model_name or out_dir.name, datasets=datasets,
                          base_model=base_model, metric_steps=metric_steps, training=training, data=data)
        io.write_text(tmp / "README.md", card)
    return out_dir


RUN_METRICS = ("val_loss", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_acc_norm_tokens", "hellaswag_n")
TRAINING_FIELDS = ("step", "tokens_seen", "skipped_steps", "world_size", "hardware")  # of trainer_state.json, for the card


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def _logged_metrics(run: RunDir, step: int | None) -> tuple[dict, dict]:
    """The latest value of each RUN_METRICS key logged at or before `step` (any step if None), and
    the step each was logged at. Records of older logs are read in today's metric names."""
    metrics, steps = {}, {}
    if not run.log.is_file():
        return metrics, steps
    for record in map(upgrade_hellaswag_record, run.read_log()):
        if step is None or record["step"] <= step:
            for key in RUN_METRICS:
                if record.get(key) is not None:
                    metrics[key], steps[key] = record[key], record["step"]
    return metrics, steps


def export_checkpoint(checkpoint_or_run, out_dir, *, data_dir=None, base_model: str | None = None,
                      hardware: str | None = None, model_name: str | None = None) -> Path:
    """Write save_hf's directory for a checkpoint (or a run's newest). Its card carries the run's
    validation loss and HellaSwag scores logged up to the checkpoint's step, each with its step, and
    from trainer_state.json the tokens trained, world size, hardware (where recorded), base model (a
    run started from Hub weights with init_from) and config.

    The card is named after the run directory (a bare checkpoint: its directory, unless that is
    step_NNNNNN; then out_dir). The training data is described by trainer_state.json's "data" (the
    data manifest's source settings) where recorded, else by `data_dir`'s manifest.json; a Hub
    source becomes the card's `datasets`.
    """
    checkpoint = resolve_checkpoint(checkpoint_or_run)
    model = load_model(checkpoint)
    state_path = checkpoint / "trainer_state.json"
    state = _read_json(state_path) if state_path.is_file() else {}
    step = state.get("step") if isinstance(state.get("step"), int) else None
    training = {key: state[key] for key in TRAINING_FIELDS if state.get(key) is not None}
    metrics, metric_steps = {}, {}
    name = None if checkpoint.name.startswith("step_") else checkpoint.name
    if checkpoint.parent.name == "checkpoints":  # RUN/checkpoints/step_NNNNNN: the run's log is two levels up
        run = RunDir(checkpoint.parent.parent)
        metrics, metric_steps = _logged_metrics(run, step)
        name = run.path.resolve().name
    data = state.get("data") if isinstance(state.get("data"), dict) else None
    if data is None and data_dir is not None:
        manifest = Path(data_dir).expanduser() / "manifest.json"
        if not manifest.is_file():
            raise UserError(f"{data_dir} is not a prepared data directory: {manifest} does not exist")
        data = _read_json(manifest).get("source")
    base_model = base_model or (state.get("base_model") if isinstance(state.get("base_model"), str) else None)
    return save_hf(model, out_dir, train_config=state.get("config"), metrics=metrics or None,
                   model_name=model_name or name, base_model=base_model, hardware=hardware,
                   metric_steps=metric_steps, training=training, data=data)
