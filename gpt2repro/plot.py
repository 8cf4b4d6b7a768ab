"""Training curves of a run from RUN/log.jsonl: loss, HellaSwag accuracy, learning rate and throughput.

The step axes carry a second axis of tokens trained (from the log's `tokens`, else
RUN/config.json's total_batch_size), a resumed invocation is marked where it starts, and validation
loss can be set beside baselines (`--baseline 3.2924 "GPT-2 124M on FineWeb-Edu"`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import io
from .errors import UserError
from .eval.hellaswag import REFERENCE_SCORES, upgrade_hellaswag_record
from .run_dir import RunDir, series

CURVES = ("train_loss", "val_loss", "hellaswag_acc", "hellaswag_acc_norm_tokens", "hellaswag_acc_norm", "lr",
          "tokens_per_sec")
HELLASWAG_CURVES = (  # key, label, line style, marker
    ("hellaswag_acc_norm_tokens", "acc_norm_tokens (completion style, per token)", "-", "o"),
    ("hellaswag_acc_norm", "acc_norm (lm-eval, per character)", "-.", "s"),
    ("hellaswag_acc", "acc (summed loss)", "--", None),
)


def ema(values: list[float], window: float) -> list[float]:
    """Exponential moving average with weight 1 - 1/window per point, debiased (as TensorBoard's
    smoothing) so the first points are not pulled towards 0; non-finite values are passed over."""
    beta = 1 - 1 / max(window, 1)
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = beta * average + (1 - beta) * value
            weight = beta * weight + (1 - beta)
        smoothed.append(average / weight if weight else value)
    return smoothed


def smoothing_window(points: int) -> float:
    """About 1/50 of the curve, between 5 and 100 points."""
    return min(100.0, max(5.0, points / 50))


def resume_steps(records: list[dict]) -> list[int]:
    """Steps at which a new invocation took over the log: a training step logged again (or an
    earlier one), or a step whose elapsed_s (the invocation's wall time) is below the previous one's."""
    resumed, previous_step, previous_elapsed = [], None, None
    for record in records:
        if "train_loss" not in record:
            continue
        step, elapsed = record["step"], record.get("elapsed_s")
        again = previous_step is not None and step <= previous_step
        restarted = isinstance(elapsed, (int, float)) and isinstance(previous_elapsed, (int, float)) and elapsed < previous_elapsed
        if (again or restarted) and step not in resumed:
            resumed.append(step)
        previous_step, previous_elapsed = step, elapsed if isinstance(elapsed, (int, float)) else previous_elapsed
    return resumed


def tokens_by_step(records: list[dict], config_path: Path):
    """(steps, tokens) pairs: tokens trained after `steps` optimizer steps, from the log's `tokens`
    (a training record of step s holds the tokens after s + 1 steps), else from config.json's
    total_batch_size. None when neither is there, or the tokens do not grow with the steps."""
    logged = {r["step"] + 1: r["tokens"] for r in records
              if "train_loss" in r and isinstance(r.get("tokens"), (int, float)) and not isinstance(r["tokens"], bool)}
    if logged:
        steps = [0, *sorted(logged)]
        tokens = [0, *(logged[s] for s in steps[1:])]
        if all(b > a for a, b in zip(steps, steps[1:])) and all(b > a for a, b in zip(tokens, tokens[1:])):
            return steps, tokens
        return None
    try:
        batch = json.loads(config_path.read_text()).get("total_batch_size")
    except (OSError, ValueError, AttributeError):
        return None
    return ([0, 1], [0, batch]) if isinstance(batch, int) and batch > 0 else None


def _piecewise_linear(xp, fp):
    """x -> y through the points (xp, fp), continued beyond them along the first and last pieces."""
    import numpy as np

    xp, fp = np.asarray(xp, dtype=float), np.asarray(fp, dtype=float)

    def f(x):
        x = np.asarray(x, dtype=float)
        y = np.interp(x, xp, fp)
        low = fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
        high = fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        return np.where(x < xp[0], low, np.where(x > xp[-1], high, y))

    return f


def format_tokens(value, _position=None) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.4g}{suffix}"
    return f"{value:.4g}"


def _baselines(baselines) -> list[tuple[float, str]]:
    checked = []
    for baseline in baselines or ():
        try:
            value, label = baseline
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"a baseline is a validation loss and a label, e.g. 3.2924 \"GPT-2 124M\"; got {baseline!r}") from None
        if not math.isfinite(value):
            raise UserError(f"baseline {label!r} is not a finite loss: {value}")
        checked.append((value, str(label)))
    return checked


def plot_run(run_dir, out=None, log_steps: bool = False, compare=(), baselines=()) -> Path:
    """One PNG: loss (train, smoothed over its faint raw curve, and validation, beside `baselines`:
    (validation loss, label) pairs), HellaSwag accuracy with the GPT-2 and GPT-3 reference scores,
    learning rate, and tokens per second. The step axes show integer steps and, above, the tokens
    trained; a dotted vertical line marks each step at which a resumed invocation took over.

    `compare` names more run directories drawn on the same axes, one colour per run and the run's
    directory name in each label, e.g. to set a shuffled run beside a sequential one. The tokens axis
    is the first run's.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator

    class LogLabels(LogFormatter):  # a log axis's labels (where matplotlib puts any) in our number format
        def __init__(self, format_number):
            super().__init__(labelOnlyBase=False)
            self.format_number = format_number

        def _num_to_string(self, x, vmin, vmax):
            return self.format_number(x)

    def label_ticks(axis, format_number, log: bool) -> None:
        if log:
            axis.set_major_formatter(LogLabels(format_number))
            axis.set_minor_formatter(LogLabels(format_number))
        else:
            axis.set_major_formatter(FuncFormatter(lambda x, _: format_number(x)))

    def format_step(x) -> str:
        return f"{x:,.0f}"

    baselines = _baselines(baselines)
    run_dirs = [Path(r).expanduser() for r in (run_dir, *compare)]
    out = Path(out) if out is not None else run_dirs[0] / "curves.png"
    runs = []
    for path in run_dirs:
        run = RunDir(path)
        records = [upgrade_hellaswag_record(r) for r in run.read_log()]
        curves = {key: series(records, key) for key in CURVES}
        resumed = resume_steps(records)
        if log_steps:  # step 0 has no place on a log axis
            curves = {k: ([s for s in x if s > 0], [v for s, v in zip(x, y) if s > 0]) for k, (x, y) in curves.items()}
            resumed = [s for s in resumed if s > 0]
        if not curves["train_loss"][0] and not curves["val_loss"][0]:
            raise UserError(f"{run.log} has no train_loss or val_loss to plot")
        runs.append((path.resolve().name, curves, resumed, tokens_by_step(records, run.config)))

    def present(*keys):
        return any(curves[k][0] for _, curves, _, _ in runs for k in keys)

    panels = ["loss"]
    panels += ["hellaswag"] if present(*(key for key, *_ in HELLASWAG_CURVES)) else []
    panels += ["lr"] if present("lr") else []
    panels += ["throughput"] if present("tokens_per_sec") else []
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.6 * nrows), squeeze=False)
    cells = [ax for row in grid for ax in row]
    for ax in cells[len(panels):]:
        fig.delaxes(ax)
    axes = dict(zip(panels, cells))

    several = len(runs) > 1
    for i, (name, curves, resumed, _) in enumerate(runs):
        # one run: a colour per curve; several: a colour per run, its name in the labels
        prefix = f"{name}: " if several else ""
        color = (lambda _: f"C{i}") if several else (lambda c: c)
        steps, losses = curves["train_loss"]
        if steps:
            window = smoothing_window(len(steps))
            axes["loss"].plot(steps, losses, color=color("tab:blue"), linewidth=0.8, alpha=0.25,
                              label=f"{prefix}train loss")
            axes["loss"].plot(steps, ema(losses, window), color=color("tab:blue"), linewidth=1.5,
                              label=f"{prefix}train loss, smoothed (EMA over ~{window:.0f} steps)")
        if curves["val_loss"][0]:
            axes["loss"].plot(*curves["val_loss"], color=color("tab:orange"), linewidth=2, marker="o", markersize=3,
                              label=f"{prefix}validation loss")
        if "hellaswag" in axes:
            for key, label, linestyle, marker in HELLASWAG_CURVES:
                if curves[key][0]:
                    axes["hellaswag"].plot(*curves[key], color=color("tab:green"), linestyle=linestyle, marker=marker,
                                           markersize=3, linewidth=2 if linestyle == "-" else 1.2,
                                           alpha=1 if linestyle == "-" else 0.7, label=f"{prefix}{label}")
        if "lr" in axes and curves["lr"][0]:
            axes["lr"].plot(*curves["lr"], color=color("tab:purple"), linewidth=1.5, label=f"{prefix}learning rate")
        if "throughput" in axes and curves["tokens_per_sec"][0]:
            axes["throughput"].plot(*curves["tokens_per_sec"], color=color("tab:brown"), linewidth=1,
                                    label=f"{prefix}tokens/s")
        for j, step in enumerate(resumed):
            for panel, ax in axes.items():
                first = j == 0 and panel == "loss"
                ax.axvline(step, color=color("gray"), linestyle=":", linewidth=1.2,
                           label=f"{prefix}resumed" if first else "_resumed")

    for value, label in baselines:
        axes["loss"].axhline(value, color="tab:red", linestyle="--", linewidth=1.2, alpha=0.8,
                             label=f"{label} ({value:.4f})")
    axes["loss"].set_ylabel("cross-entropy loss (nats per token)")
    axes["loss"].set_title("Loss")

    if "hellaswag" in axes:
        ax = axes["hellaswag"]
        styles = {"GPT-2 124M": ("tab:red", "-."), "GPT-3 Small (124M)": ("tab:purple", ":")}
        for name, scores in REFERENCE_SCORES.items():
            if "hellaswag_acc_norm_tokens" in scores:  # both published scores are token-normalised
                color, linestyle = styles.get(name, ("gray", "-."))
                value = scores["hellaswag_acc_norm_tokens"]
                ax.axhline(value, color=color, linestyle=linestyle, linewidth=1.5,
                           label=f"{name} acc_norm_tokens ({value:.4g})")
        ax.axhline(0.25, color="gray", linestyle=":", linewidth=1, label="chance (0.25)")
        ax.set_ylabel("HellaSwag accuracy")
        ax.set_title("HellaSwag validation")
    if "lr" in axes:
        axes["lr"].set_ylabel("learning rate")
        axes["lr"].set_title("Learning rate")
        axes["lr"].yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    if "throughput" in axes:
        axes["throughput"].set_ylabel("tokens per second")
        axes["throughput"].set_title("Throughput")
        axes["throughput"].yaxis.set_major_formatter(FuncFormatter(format_tokens))

    tokens = runs[0][3]
    for ax in axes.values():
        ax.set_xlabel("optimizer step" + (" (log scale)" if log_steps else ""))
        if log_steps:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 12.5
        label_ticks(ax.xaxis, format_step, log_steps)
        if tokens is not None:
            to_tokens, to_steps = _piecewise_linear(*tokens), _piecewise_linear(tokens[1], tokens[0])
            top = ax.secondary_xaxis("top", functions=(to_tokens, to_steps))
            label_ticks(top.xaxis, format_tokens, log_steps)
            top.set_xlabel("tokens trained" + (f" ({runs[0][0]})" if several else ""), fontsize=9)
            top.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gpt2repro run{'s' * several} {' vs '.join(name for name, *_ in runs)}", fontsize=13)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(out, "wb") as f:  # never leave a half-written image behind
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    return out
