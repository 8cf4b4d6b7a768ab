"""The `eval` command: HellaSwag and/or validation loss of one model, in one process."""

from __future__ import annotations

from typing import Callable

from ..data import validation_batches
from ..errors import UserError
from ..model import GPT
from .device import autocast, inference_device
from .hellaswag import REFERENCE_SCORES, evaluate_hellaswag
from .hellaswag_data import load_hellaswag
from .validation import perplexity, validation_loss


def evaluate_model(
    load_model: Callable[[], GPT],
    hellaswag: str | None = None,
    split: str = "validation",
    data_dir: str | None = None,
    val_batches: int = 20,
    val_batch_size: int = 8,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """HellaSwag and/or validation loss of the model `load_model()` returns, in one process. The
    model is loaded only once the other arguments have been checked."""
    if hellaswag is None and data_dir is None:
        raise UserError("nothing to evaluate: pass --hellaswag auto|PATH and/or --data DIR")
    if min(val_batches, val_batch_size, batch_size) < 1:
        raise UserError("batch sizes and the number of validation batches must be at least 1")
    examples = load_hellaswag(hellaswag, split) if hellaswag is not None else None  # bad input fails before loading a model
    device, autocast_dtype = inference_device(device)
    model = load_model()
    model.to(device).eval()
    results = {}
    if examples is not None:
        results.update(evaluate_hellaswag(
            lambda idx: model(idx)[0], examples, device, batch_size=batch_size,
            autocast_dtype=autocast_dtype, pad_to=model.config.block_size, progress=progress,
        ))
    if data_dir is not None:
        batches = validation_batches(
            data_dir, val_batch_size, model.config.block_size, val_batches, vocab_size=model.config.vocab_size
        )
        def loss_fn(x, y):
            with autocast(device, autocast_dtype):
                return model(x.to(device), y.to(device))[1]

        results["val_loss"] = validation_loss(loss_fn, batches)
        results["val_perplexity"] = perplexity(results["val_loss"])
    return results


def format_results(results: dict) -> str:
    """A readable table of eval results, with the reference models' HellaSwag scores beside ours.

    A reference stands only beside the score computed by the same rule: GPT-2 124M's and GPT-3
    Small's published HellaSwag numbers are token-normalised (acc_norm_tokens), not lm-eval's acc_norm."""
    width = max([len("metric"), *map(len, results)])
    lines = [f"{'metric':<{width}} {'value':>10}  reference"]
    for key, value in results.items():
        references = ", ".join(f"{name} {scores[key]:.4f}" for name, scores in REFERENCE_SCORES.items() if key in scores)
        shown = "-" if value is None else f"{value:>10,}" if isinstance(value, int) else f"{value:>10.4f}"
        lines.append(f"{key:<{width}} {shown:>10}  {references}".rstrip())
    if any(key.startswith("hellaswag_acc") for key in results):
        lines.append("HellaSwag, completion style: acc = lowest summed loss of the ending, acc_norm_tokens = per token "
                     "(GPT-2 reproduction), acc_norm = per character (lm-eval, Open LLM Leaderboard)")
    return "\n".join(lines)
