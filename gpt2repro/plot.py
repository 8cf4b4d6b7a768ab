"""Training curves of a run: train and validation loss, and HellaSwag accuracy, from RUN/log.jsonl."""

from __future__ import annotations

from pathlib import Path

from . import io
from .errors import UserError
from .eval.hellaswag import REFERENCE_SCORES
from .run_dir import RunDir, series


def plot_run(run_dir, out=None, log_steps: bool = False, compare=()) -> Path:
    """One PNG: train/validation loss beside HellaSwag accuracy with GPT-2 and GPT-3 reference lines.

    `compare` names more run directories drawn on the same axes, one colour per run and the run's
    directory name in each label, e.g. to set a shuffled run beside a sequential one.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    run_dirs = [Path(r).expanduser() for r in (run_dir, *compare)]
    out = Path(out) if out is not None else run_dirs[0] / "curves.png"
    runs = []
    for path in run_dirs:
        records = RunDir(path).read_log()
        curves = {key: series(records, key) for key in ("train_loss", "val_loss", "hellaswag_acc", "hellaswag_acc_norm")}
        if log_steps:  # step 0 has no place on a log axis
            curves = {k: ([s for s in x if s > 0], [v for s, v in zip(x, y) if s > 0]) for k, (x, y) in curves.items()}
        if not curves["train_loss"][0] and not curves["val_loss"][0]:
            raise UserError(f"{path / 'log.jsonl'} has no train_loss or val_loss to plot")
        runs.append((path.resolve().name, curves))
    with_hellaswag = any(c["hellaswag_acc_norm"][0] or c["hellaswag_acc"][0] for _, c in runs)

    fig, axes = plt.subplots(1, 2 if with_hellaswag else 1, figsize=(13 if with_hellaswag else 7, 4.8), squeeze=False)
    loss_ax = axes[0][0]
    hellaswag_ax = axes[0][1] if with_hellaswag else None
    several = len(runs) > 1
    for i, (name, curves) in enumerate(runs):
        # one run: a colour per curve; several: a colour per run, its name in the labels
        prefix = f"{name}: " if several else ""
        train_color, val_color, hellaswag_color = (f"C{i}",) * 3 if several else ("tab:blue", "tab:orange", "tab:green")
        if curves["train_loss"][0]:
            loss_ax.plot(*curves["train_loss"], color=train_color, linewidth=1, alpha=0.5 if several else 0.8,
                         label=f"{prefix}train loss")
        if curves["val_loss"][0]:
            loss_ax.plot(*curves["val_loss"], color=val_color, linewidth=2, marker="o", markersize=3,
                         label=f"{prefix}validation loss")
        if hellaswag_ax is not None:
            if curves["hellaswag_acc_norm"][0]:
                hellaswag_ax.plot(*curves["hellaswag_acc_norm"], color=hellaswag_color, linewidth=2, marker="o",
                                  markersize=3, label=f"{prefix}acc_norm")
            if curves["hellaswag_acc"][0]:
                hellaswag_ax.plot(*curves["hellaswag_acc"], color=hellaswag_color, linewidth=1, linestyle="--",
                                  alpha=0.6, label=f"{prefix}acc")
    loss_ax.set_ylabel("cross-entropy loss (nats per token)")
    loss_ax.set_title("Loss")

    if hellaswag_ax is not None:
        ax = hellaswag_ax
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
    fig.suptitle(f"gpt2repro run{'s' * several} {' vs '.join(name for name, _ in runs)}", fontsize=13)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(out, "wb") as f:  # never leave a half-written image behind
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    return out
