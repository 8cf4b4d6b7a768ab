"""`gpt2repro export`: a training checkpoint -> a Hugging Face model directory with the run's results."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

RUN_METRICS = ("val_loss", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n")


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory as given, or the newest complete checkpoint of a run directory."""
    from .checkpoint import is_checkpoint_dir, latest_checkpoint

    path = Path(path).expanduser()
    if is_checkpoint_dir(path):
        return path
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise UserError(f"run {path} has no complete checkpoint in {path / 'checkpoints'}")
        return latest
    raise UserError(f"{path} is neither a gpt2repro checkpoint (config.json with format gpt2repro) nor a run directory")


def run_metrics(run_dir, step: int | None) -> dict:
    """The latest val_loss and HellaSwag results logged at or before `step` (all steps if None)."""
    from .plot import read_log

    if not (Path(run_dir) / "log.jsonl").is_file():
        return {}
    metrics = {}
    for record in read_log(run_dir):
        if step is None or record["step"] <= step:
            metrics.update({k: record[k] for k in RUN_METRICS if record.get(k) is not None})
    return metrics


def export_checkpoint(checkpoint_or_run, out_dir) -> Path:
    """Write save_hf's directory for a checkpoint (or a run's newest), its card carrying the run's
    validation loss and HellaSwag scores as of the checkpoint's step and the training config."""
    from .checkpoint import load_model_dir
    from .hf import save_hf

    checkpoint = resolve_checkpoint(checkpoint_or_run)
    model = load_model_dir(checkpoint)
    state_path = checkpoint / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{state_path} is not valid JSON") from None
    step = state.get("step")
    metrics = {k: state[k] for k in ("step", "tokens") if isinstance(state.get(k), int)}
    if checkpoint.parent.name == "checkpoints":  # RUN/checkpoints/step_NNNNNN: the run's log is two levels up
        metrics.update(run_metrics(checkpoint.parent.parent, step if isinstance(step, int) else None))
    return save_hf(model, out_dir, train_config=state.get("config"), metrics=metrics or None)
