"""The model card (README.md) of an export: Hub metadata, metrics as model-index, the recipe."""

from __future__ import annotations

import yaml

from ..model import GPT

def model_card(
    model: GPT,
    train_config: dict | None = None,
    metrics: dict | None = None,
    model_name: str = "gpt2repro-gpt2",
    datasets: list[str] | None = None,
) -> str:
    """README.md with Hub metadata; eval results in `metrics` become `model-index` entries.

    Recognised metric keys: val_loss, hellaswag_acc, hellaswag_acc_norm (others are listed in the text).
    """
    metrics = dict(metrics or {})
    meta: dict = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "mit",
        "language": ["en"],
        "tags": ["gpt2", "gpt2repro", "text-generation"],
    }
    if datasets:
        meta["datasets"] = list(datasets)
    results = []
    hellaswag = [
        {"type": "acc", "name": "accuracy", "value": float(metrics[k])} if k == "hellaswag_acc"
        else {"type": "acc_norm", "name": "normalized accuracy", "value": float(metrics[k])}
        for k in ("hellaswag_acc", "hellaswag_acc_norm") if k in metrics
    ]
    if hellaswag:
        results.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"type": "Rowan/hellaswag", "name": "HellaSwag", "split": "validation"},
            "metrics": hellaswag,
        })
    if "val_loss" in metrics:
        results.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"type": "validation-split", "name": metrics.get("val_dataset", "held-out validation split")},
            "metrics": [{"type": "loss", "name": "validation loss", "value": float(metrics["val_loss"])}],
        })
    if results:
        meta["model-index"] = [{"name": model_name, "results": results}]

    c = model.config
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {model_name}", "",
        f"A GPT-2 model ({model.num_params():,} parameters: {c.n_layer} layers, {c.n_head} heads, "
        f"width {c.n_embd}, context {c.block_size}) trained from scratch with gpt2repro. "
        "It is a plain `GPT2LMHeadModel` with GPT-2's tokenizer:", "",
        "```python", "from transformers import pipeline", "",
        'generator = pipeline("text-generation", model="PATH_OR_REPO_ID")',
        'print(generator("Hello, I\'m a language model,", max_new_tokens=32, do_sample=True, top_k=50))',
        "```", "",
    ]
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    if train_config:
        lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(train_config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
