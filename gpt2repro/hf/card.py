"""The model card (README.md) of an export, built with huggingface_hub's ModelCard: Hub metadata
(`ModelCardData`), the evaluation results as `EvalResult`s (the card's `model-index`), and a text
that reports what the run measured, at which step, on how many tokens and on what hardware."""

from __future__ import annotations

from pathlib import PurePath

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..io import is_hub_id
from ..model import GPT

TASK = {"task_type": "text-generation", "task_name": "Text Generation"}

# metric key -> (EvalResult metric_type, what the card calls it, how it was measured)
HELLASWAG_METRICS = {
    "hellaswag_acc": ("acc", "accuracy", "completion style: the ending with the lowest summed loss"),
    "hellaswag_acc_norm": ("acc_norm", "normalized accuracy (lm-eval style)",
                           "lm-eval's acc_norm rule: the lowest loss per character of the ending"),
    "hellaswag_acc_norm_tokens": ("acc_norm_tokens", "normalized accuracy (completion style, token-normalised)",
                                  "completion style, token-normalised: the lowest loss per token of the ending "
                                  "(the GPT-2 reproduction's acc_norm)"),
}


def hub_datasets(data: dict | None) -> list[str]:
    """The Hub dataset ids among a data manifest's sources (its "source" settings); local files are
    absolute paths, so they never read as ids."""
    sources = (data or {}).get("sources") or []
    return [s for s in sources if isinstance(s, str) and not PurePath(s).is_absolute() and is_hub_id(s)]


def _validation_dataset(data: dict | None, datasets: list[str]) -> dict:
    """EvalResult fields naming where the validation loss was measured: the held-out first tokens
    of the training data (a real Hub id when the data came from the Hub, a description otherwise)."""
    data = data or {}
    val_tokens = data.get("val_tokens")
    held_out = f"first {val_tokens:,} tokens held out for validation" if isinstance(val_tokens, int) else "held-out part"
    if datasets:
        config = data.get("name")
        return {"dataset_type": datasets[0], "dataset_config": config,
                "dataset_name": f"{datasets[0]}{f' ({config})' if config else ''}, {held_out}"}
    files = [PurePath(s).name for s in data.get("sources") or [] if isinstance(s, str)]
    if files:
        described = f"local data ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})"
        return {"dataset_type": described, "dataset_name": f"{described}, {held_out}"}
    return {"dataset_type": "held-out validation split", "dataset_name": "held-out validation split"}


def _hellaswag_dataset(train_config: dict | None) -> dict:
    source = (train_config or {}).get("hellaswag")
    if source in (None, "auto"):  # the official validation split
        return {"dataset_type": "Rowan/hellaswag", "dataset_name": "HellaSwag", "dataset_split": "validation"}
    name = f"HellaSwag-format local file {PurePath(str(source)).name}"
    return {"dataset_type": name, "dataset_name": name}


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def model_card(
    model: GPT,
    train_config: dict | None = None,
    metrics: dict | None = None,
    model_name: str = "gpt2repro-gpt2",
    datasets: list[str] | None = None,
    *,
    base_model: str | None = None,
    metric_steps: dict | None = None,
    training: dict | None = None,
    data: dict | None = None,
) -> str:
    """README.md of an export: YAML front matter from ModelCardData, then the text.

    metrics: val_loss, hellaswag_acc, hellaswag_acc_norm (lm-eval's rule), hellaswag_acc_norm_tokens,
        hellaswag_n; any other key is listed in the text only.
    metric_steps: the optimizer step each metric was measured at. With training["step"] (the step of
        the exported weights) known, only metrics measured at that step go into `model-index`; those
        measured earlier are shown in the text with their step, as measurements of earlier weights.
    training: from trainer_state.json: step, tokens_seen, world_size, skipped_steps, and hardware
        (e.g. "1 x NVIDIA H200") where recorded.
    data: the training data manifest's "source" settings (sources, name, split, val_tokens).
    datasets: Hub ids of the training data; by default those among data's sources.
    base_model: the Hub id the weights started from; None for a model trained from scratch.
    """
    metrics = dict(metrics or {})
    metric_steps = dict(metric_steps or {})
    training = dict(training or {})
    datasets = list(datasets) if datasets is not None else hub_datasets(data)
    step = training.get("step")

    def for_these_weights(key) -> bool:
        return step is None or key not in metric_steps or metric_steps[key] == step

    eval_results = []
    if "val_loss" in metrics and for_these_weights("val_loss"):
        eval_results.append(EvalResult(**TASK, **_validation_dataset(data, datasets), metric_type="loss",
                                       metric_name="validation loss", metric_value=float(metrics["val_loss"])))
    hellaswag = _hellaswag_dataset(train_config)
    for key, (metric_type, metric_name, _) in HELLASWAG_METRICS.items():
        if metrics.get(key) is not None and for_these_weights(key):
            eval_results.append(EvalResult(**TASK, **hellaswag, metric_type=metric_type, metric_name=metric_name,
                                           metric_value=float(metrics[key])))
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=datasets or None,
        eval_results=eval_results or None,
        language=["en"],
        license="mit",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "gpt2repro", "text-generation"],
    )

    c = model.config
    init_from = (train_config or {}).get("init_from") or "scratch"
    if base_model:
        origin = f"trained further from [{base_model}](https://huggingface.co/{base_model})"
    elif init_from != "scratch":
        origin = f"trained further from the weights of `{PurePath(init_from).name}`"
    else:
        origin = "trained from scratch"
    config = (data or {}).get("name") if datasets else None
    on_data = f" on {', '.join(datasets)}{f' ({config})' if config else ''}" if datasets else ""
    lines = [
        f"# {model_name}", "",
        f"A GPT-2 model ({model.num_params():,} parameters: {c.n_layer} layers, {c.n_head} heads, "
        f"width {c.n_embd}, context {c.block_size}) {origin}{on_data} with gpt2repro. "
        "It is a plain `GPT2LMHeadModel` with GPT-2's tokenizer:", "",
        "```python", "from transformers import pipeline", "",
        'generator = pipeline("text-generation", model="PATH_OR_REPO_ID")',
        'print(generator("Hello, I\'m a language model,", max_new_tokens=32, do_sample=True, top_k=50))',
        "```", "",
    ]

    rows = []
    if step is not None:
        rows.append(("weights", f"after optimizer step {step:,}"))
    if isinstance(training.get("tokens_seen"), int):
        rows.append(("tokens trained", f"{training['tokens_seen']:,}"))
    if training.get("skipped_steps"):
        rows.append(("skipped steps (non-finite gradients)", f"{training['skipped_steps']:,}"))
    if training.get("hardware"):
        rows.append(("hardware", str(training["hardware"])))
    if isinstance(training.get("world_size"), int):
        rows.append(("processes (world size)", f"{training['world_size']:,}"))
    if datasets or data:
        sources = datasets or [PurePath(s).name for s in (data or {}).get("sources") or []]
        detail = f" (config {config}, split {data.get('split') or 'train'})" if config else ""
        rows.append(("training data", ", ".join(sources) + detail))
    if rows:
        lines += ["## Training", "", "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
        if step is not None and not training.get("hardware"):
            lines += ["The hardware was not recorded.", ""]

    if metrics:
        shown_steps = bool(metric_steps)
        lines += ["## Evaluation", ""]
        if shown_steps and step is not None:
            lines += [f"As logged by the run. Metrics measured at step {step:,} are the exported weights' own and "
                      "are the card's `model-index`; any measured at an earlier step are of earlier weights.", ""]
        header = "| metric | value |" + (" step |" if shown_steps else "") + " how |"
        lines += [header, "| --- | --- |" + (" --- |" if shown_steps else "") + " --- |"]
        how = {key: text for key, (_, _, text) in HELLASWAG_METRICS.items()}
        how["val_loss"] = "mean cross-entropy (nats per token) on " + _validation_dataset(data, datasets)["dataset_name"]
        how["hellaswag_n"] = "HellaSwag examples scored"
        for key, value in metrics.items():
            where = ""
            if shown_steps:
                measured = metric_steps.get(key)
                where = f" {_fmt(measured) if measured is not None else '-'}"
                if measured is not None and step is not None and measured != step:
                    where += " (earlier weights)"
                where += " |"
            lines.append(f"| {key} | {_fmt(value)} |{where} {how.get(key, '-')} |")
        lines.append("")
        if any(k in metrics for k in HELLASWAG_METRICS):
            lines += ["HellaSwag is scored on the official `ctx` and `endings` fields, each ending after \" \". "
                      "lm-eval's `hellaswag` task rewrites the context first (activity label, WikiHow's bracketed "
                      "artifacts removed), so its scores for these weights can differ slightly.", ""]
    if train_config:
        lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(train_config, sort_keys=False).strip(), "```", ""]

    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)
