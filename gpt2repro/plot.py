"""Training curves of a run: train and validation loss, and HellaSwag accuracy, from RUN/log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def read_log(run_dir) -> list[dict]:
    """The records of RUN/log.jsonl in order. A last line cut short (a crash mid-write) is skipped."""
    path = Path(run_dir).expanduser() / "log.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; is {run_dir} a run directory?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e})") from None
    records = []
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if line_number == len(lines):  # no newline after it: the writer was interrupted
                break
            raise UserError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{line_number}: expected a JSON object with an integer 'step'")
        records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged again after a resume keeps its latest value."""
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_run(run_dir, out=None, log_steps: bool = False) -> Path:
    """One PNG: train/validation loss beside HellaSwag accuracy with GPT-2 and GPT-3 reference lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    from .evaluation import REFERENCE_SCORES

    run_dir = Path(run_dir).expanduser()
    out = Path(out) if out is not None else run_dir / "curves.png"
    records = read_log(run_dir)
    curves = {key: series(records, key) for key in ("train_loss", "val_loss", "hellaswag_acc", "hellaswag_acc_norm")}
    if log_steps:  # step 0 has no place on a log axis
        curves = {k: ([s for s in x if s > 0], [v for s, v in zip(x, y) if s > 0]) for k, (x, y) in curves.items()}
    if not curves["train_loss"][0] and not curves["val_loss"][0]:
        raise UserError(f"{run_dir / 'log.jsonl'} has no train_loss or val_loss to plot")
    with_hellaswag = bool(curves["hellaswag_acc_norm"][0] or curves["hellaswag_acc"][0])

    fig, axes = plt.subplots(1, 2 if with_hellaswag else 1, figsize=(13 if with_hellaswag else 7, 4.8), squeeze=False)
    loss_ax = axes[0][0]
    if curves["train_loss"][0]:
        loss_ax.plot(*curves["train_loss"], color="tab:blue", linewidth=1, alpha=0.8, label="train loss")
    if curves["val_loss"][0]:
        loss_ax.plot(*curves["val_loss"], color="tab:orange", linewidth=2, marker="o", markersize=3, label="validation loss")
    loss_ax.set_ylabel("cross-entropy loss (nats per token)")
    loss_ax.set_title("Loss")

    if with_hellaswag:
        ax = axes[0][1]
        if curves["hellaswag_acc_norm"][0]:
            ax.plot(*curves["hellaswag_acc_norm"], color="tab:green", linewidth=2, marker="o", markersize=3, label="acc_norm")
        if curves["hellaswag_acc"][0]:
            ax.plot(*curves["hellaswag_acc"], color="tab:green", linewidth=1, linestyle="--", alpha=0.6, label="acc")
        styles = {"GPT-2 124M": ("tab:red", "-."), "GPT-3 Small (124M)": ("tab:purple", ":")}
        for name, scores in REFERENCE_SCORES.items():
            color, linestyle = styles.get(name, ("gray", "-."))
            value = scores["hellaswag_acc_norm"]
            ax.axhline(value, color=color, linestyle=linestyle, linewidth=1.5, label=f"{name} acc_norm ({value:.4g})")
        ax.axhline(0.25, color="gray", linestyle=":", linewidth=1, label="chance (0.25)")
        ax.set_ylabel("HellaSwag accuracy (completion style)")
        ax.set_title("HellaSwag validation")

    for ax in axes[0]:
        ax.set_xlabel("optimizer step" + (" (log scale)" if log_steps else ""))
        if log_steps:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(f"gpt2repro run {run_dir.resolve().name}", fontsize=13)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")  # never leave a half-written image behind
    fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)
    partial.replace(out)
    return out
