import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from gpt2repro import GPT, TrainConfig
from gpt2repro.__main__ import main
from gpt2repro.errors import UserError
from gpt2repro.hf.export import export_checkpoint
from gpt2repro.hf.hub import push_to_hub
from gpt2repro.plot import ema, plot_run, resume_steps, smoothing_window, tokens_by_step
from gpt2repro.run_dir import RunDir, series
from helpers import optimizer_for, write_checkpoint

EXPORT_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "README.md",
}


def cli(*args, env=None):
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2repro", *args], capture_output=True, text=True, env=env, timeout=300)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def write_log(run, records, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def training_log(steps=40):
    records = []
    for step in range(steps):
        records.append({"step": step, "train_loss": 10.9 - 0.1 * step + (0.3 if step % 2 else -0.3), "lr": 6e-4 * (1 - step / 80),
                        "grad_norm": 1.0, "tokens_per_sec": 1e5 + 100 * step, "mfu": 0.4, "ms": 100.0,
                        "tokens": 4096 * (step + 1), "elapsed_s": 0.1 * (step + 1)})
        if step % 10 == 0 or step == steps - 1:
            records.append({"step": step, "val_loss": 11.0 - 0.1 * step})
        if step % 20 == 0 or step == steps - 1:
            records.append({"step": step, "hellaswag_acc": 0.25 + step / 1000, "hellaswag_acc_norm_tokens": 0.26 + step / 1000,
                            "hellaswag_acc_norm": 0.255 + step / 1000, "hellaswag_n": 10042})
    return records


def model_index(card: str) -> dict:
    """{(dataset type, metric type): value} of a card's model-index."""
    [entry] = front_matter(card)["model-index"]
    return {(r["dataset"]["type"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with checkpoints at steps 20 and 30 (the newer one recording its hardware) and a log that
    goes on to step 39."""
    run = tmp_path_factory.mktemp("runs") / "gpt2repro-tiny"
    cfg = TrainConfig.from_dict({"model": {"block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}, "hellaswag": "auto"})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizer = optimizer_for(model, 0.1, 6e-4)
    for step, hardware in ((20, None), (30, {"hardware": "2 x NVIDIA H200"})):
        write_checkpoint(run / "checkpoints", step, model, optimizer,
                         {"step": step, "tokens_seen": 4096 * step, "world_size": 2, **(hardware or {}),
                          "config": cfg.to_dict()})
    write_log(run, training_log())
    return run


def test_export_of_a_checkpoint_carries_the_metrics_logged_at_its_step(run_dir, tmp_path):
    out = export_checkpoint(run_dir / "checkpoints" / "step_000020", tmp_path / "hf")
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    # step 20's HellaSwag and val loss, not the later step 39's; the card is named after the run, not "hf"
    assert meta["model-index"][0]["name"] == "gpt2repro-tiny"
    assert model_index(card) == {
        ("held-out validation split", "loss"): pytest.approx(9.0), ("Rowan/hellaswag", "acc"): pytest.approx(0.27),
        ("Rowan/hellaswag", "acc_norm"): pytest.approx(0.275), ("Rowan/hellaswag", "acc_norm_tokens"): pytest.approx(0.28),
    }
    assert meta["license"] == "mit" and meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "datasets" not in meta and "base_model" not in meta  # no Hub data recorded; trained from scratch
    assert "# gpt2repro-tiny" in card and "trained from scratch" in card
    assert "| val_loss | 9.0000 | 20 |" in card and "| hellaswag_n | 10,042 | 20 |" in card
    assert "| hellaswag_acc_norm_tokens | 0.2800 | 20 | completion style, token-normalised" in card
    assert "| hellaswag_acc_norm | 0.2750 | 20 | lm-eval's acc_norm rule" in card
    assert "| weights | after optimizer step 20 |" in card and "| tokens trained | 81,920 |" in card
    assert "| processes (world size) | 2 |" in card and "The hardware was not recorded." in card
    assert "total_batch_size: 524288" in card  # the training config from trainer_state.json
    assert {p.name for p in out.iterdir()} == EXPORT_FILES


def test_export_of_a_run_takes_its_newest_checkpoint_and_loads_in_transformers(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert str(tmp_path / "export") in capsys.readouterr().out
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| weights | after optimizer step 30 |" in card and "| hardware | 2 x NVIDIA H200 |" in card
    assert "not recorded" not in card
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert hf.config.n_layer == 2 and hf.config.vocab_size == 50257


def test_export_card_lists_only_measurements_of_the_exported_weights_in_its_model_index(run_dir, tmp_path):
    card = (export_checkpoint(run_dir, tmp_path / "hf") / "README.md").read_text()
    # checkpoint 30: validation loss was measured at step 30, HellaSwag last at step 20 (other weights)
    assert model_index(card) == {("held-out validation split", "loss"): pytest.approx(8.0)}
    assert "| val_loss | 8.0000 | 30 |" in card
    assert "| hellaswag_acc_norm_tokens | 0.2800 | 20 (earlier weights) |" in card
    assert "| hellaswag_acc | 0.2700 | 20 (earlier weights) |" in card


def write_manifest(data_dir, sources, name=None):
    data_dir.mkdir(parents=True)
    source = {"sources": sources, "name": name, "split": "train", "text_field": "text", "shard_size": 1000,
              "val_tokens": 100_000}
    (data_dir / "manifest.json").write_text(json.dumps({"format": "gpt2repro-tokens-1", "source": source, "shards": []}))
    return data_dir


def test_export_names_hub_training_data_as_datasets_and_local_data_by_its_files(run_dir, tmp_path):
    hub = write_manifest(tmp_path / "fineweb", ["HuggingFaceFW/fineweb-edu"], name="sample-10BT")
    card = (export_checkpoint(run_dir, tmp_path / "a", data_dir=hub) / "README.md").read_text()
    meta = front_matter(card)
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    [loss] = [r for r in meta["model-index"][0]["results"] if r["metrics"][0]["type"] == "loss"]
    assert loss["dataset"]["type"] == "HuggingFaceFW/fineweb-edu" and loss["dataset"]["config"] == "sample-10BT"
    assert "first 100,000 tokens held out for validation" in loss["dataset"]["name"]
    assert "| training data | HuggingFaceFW/fineweb-edu (config sample-10BT, split train) |" in card

    local = write_manifest(tmp_path / "books", [str(tmp_path / "corpus" / "books.jsonl")])
    card = (export_checkpoint(run_dir, tmp_path / "b", data_dir=local, base_model="gpt2") / "README.md").read_text()
    meta = front_matter(card)
    assert "datasets" not in meta and meta["base_model"] == "gpt2" and "trained further from [gpt2]" in card
    assert model_index(card) == {("local data (books.jsonl)", "loss"): pytest.approx(8.0)}


def test_export_reads_a_log_written_before_acc_norm_tokens_as_token_normalised(tmp_path):
    run = tmp_path / "old-run"
    torch.manual_seed(0)
    model = GPT(TrainConfig.from_dict({"model": {"block_size": 64, "n_layer": 1, "n_head": 1, "n_embd": 8}}).model)
    write_checkpoint(run / "checkpoints", 5, model, optimizer_for(model), {"step": 5, "tokens_seen": 20480})
    write_log(run, [{"step": 5, "hellaswag_acc": 0.27, "hellaswag_acc_norm": 0.29, "hellaswag_n": 10042}])  # the old names
    card = (export_checkpoint(run, tmp_path / "hf") / "README.md").read_text()
    assert model_index(card) == {("Rowan/hellaswag", "acc"): 0.27, ("Rowan/hellaswag", "acc_norm_tokens"): 0.29}
    assert "| hellaswag_acc_norm_tokens | 0.2900 | 5 |" in card and "| hellaswag_acc_norm |" not in card


def test_export_of_a_directory_that_is_no_checkpoint_fails_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = cli("export", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "neither a gpt2repro checkpoint" in result.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    return export_checkpoint(run_dir, tmp_path_factory.mktemp("export") / "hf")


def test_push_dry_run_lists_every_export_file_and_a_card_whose_yaml_has_the_results(export_dir, capsys):
    assert main(["push", str(export_dir), "--repo-id", "someone/gpt2repro-tiny", "--private", "--dry-run"]) == 0
    out = capsys.readouterr().out
    header, _, card = out.partition("\nmodel card (README.md):\n")
    assert "would upload 9 files to private model repo someone/gpt2repro-tiny (revision main)" in header
    listed = {line.split()[0] for line in header.splitlines()[1:] if line.strip()}
    assert listed == EXPORT_FILES
    meta = front_matter(card)
    assert meta["model-index"][0]["name"] == "gpt2repro-tiny"
    assert model_index(card) == {("held-out validation split", "loss"): pytest.approx(8.0)}  # checkpoint 30's own
    assert "| hellaswag_acc_norm_tokens | 0.2800 | 20 (earlier weights) |" in card


def test_push_dry_run_plan_equals_the_files_a_real_push_would_send(export_dir):
    plan = push_to_hub(export_dir, "someone/name", revision="v1", dry_run=True)
    assert plan["revision"] == "v1" and not plan["private"]
    assert {name for name, _ in plan["files"]} == EXPORT_FILES
    assert dict(plan["files"])["model.safetensors"] == (export_dir / "model.safetensors").stat().st_size


def test_push_without_a_token_fails_in_one_line(export_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = cli("push", str(export_dir), "--repo-id", "someone/name", env=env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "HF_TOKEN" in result.stderr


def test_push_offline_with_a_token_fails_in_one_line(export_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(UserError, match="cannot push to someone/name on the Hugging Face Hub") as error:
        push_to_hub(export_dir, "someone/name")
    assert "\n" not in str(error.value)


def test_push_refuses_a_directory_that_is_not_an_export_and_a_bad_repo_id(export_dir, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a gpt2repro export"):
        push_to_hub(tmp_path, "someone/name", dry_run=True)
    with pytest.raises(UserError, match="USER/NAME"):
        push_to_hub(export_dir, "no-slash", dry_run=True)


# ---------------------------------------------------------------------------------------------
# plot


def test_plot_writes_a_png_that_decodes_with_its_four_panels(run_dir, tmp_path):
    from PIL import Image

    out = plot_run(run_dir, tmp_path / "curves.png")
    assert out.stat().st_size > 40_000
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        width, height = image.size
        assert image.format == "PNG" and 1.2 * height < width < 1.6 * height  # two rows of two panels


def drawn_figure(monkeypatch):
    """Keeps the figure plot_run draws, for inspection after it is saved."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    return figures


def labelled_lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_draws_losses_hellaswag_learning_rate_and_throughput_with_reference_lines(run_dir, tmp_path, monkeypatch):
    figures = drawn_figure(monkeypatch)
    plot_run(run_dir, tmp_path / "curves.png", log_steps=True)
    [figure] = figures
    loss_ax, hellaswag_ax, lr_ax, throughput_ax = figure.axes
    assert [ax.get_title() for ax in figure.axes] == ["Loss", "HellaSwag validation", "Learning rate", "Throughput"]
    lines = {**labelled_lines(loss_ax), **labelled_lines(hellaswag_ax)}
    records = training_log()
    val_steps = [r["step"] for r in records if "val_loss" in r and r["step"] > 0]  # step 0 cannot sit on a log axis
    assert list(lines["validation loss"].get_xdata()) == val_steps
    assert list(lines["validation loss"].get_ydata()) == [pytest.approx(11.0 - 0.1 * s) for s in val_steps]
    assert list(lines["train loss"].get_xdata()) == list(range(1, 40))
    assert lines["train loss"].get_alpha() < 0.5  # the raw curve is faint
    [smoothed] = [label for label in lines if label.startswith("train loss, smoothed")]
    assert list(lines[smoothed].get_xdata()) == list(range(1, 40))
    assert list(lines["acc_norm_tokens (completion style, per token)"].get_xdata()) == [20, 39]
    assert list(lines["acc_norm (lm-eval, per character)"].get_ydata()) == [pytest.approx(0.275), pytest.approx(0.294)]
    assert "acc (summed loss)" in lines
    references = {label: line.get_ydata()[0] for label, line in lines.items() if "acc_norm_tokens (0" in label}
    assert references == {"GPT-2 124M acc_norm_tokens (0.2955)": 0.2955, "GPT-3 Small (124M) acc_norm_tokens (0.337)": 0.337}
    train = [r for r in records if "train_loss" in r][1:]
    assert list(labelled_lines(lr_ax)["learning rate"].get_ydata()) == [r["lr"] for r in train]
    assert list(labelled_lines(throughput_ax)["tokens/s"].get_ydata()) == [r["tokens_per_sec"] for r in train]
    for ax in figure.axes:
        assert ax.get_xscale() == "log" and ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert ax.get_legend() is not None
        [tokens_axis] = ax.child_axes  # tokens trained, above the steps
        assert tokens_axis.get_xlabel() == "tokens trained"
    assert "run" in figure.get_suptitle()


def test_plot_smooths_train_loss_with_a_debiased_ema_over_the_faint_raw_curve(run_dir, tmp_path, monkeypatch):
    figures = drawn_figure(monkeypatch)
    plot_run(run_dir, tmp_path / "curves.png")
    lines = labelled_lines(figures[0].axes[0])
    raw = list(lines["train loss"].get_ydata())
    [smoothed] = [line for label, line in lines.items() if label.startswith("train loss, smoothed")]
    assert list(smoothed.get_ydata()) == pytest.approx(ema(raw, smoothing_window(len(raw))))
    assert smoothed.get_ydata()[0] == pytest.approx(raw[0])  # debiased: starts at the first value, not near 0
    wiggle = lambda ys: sum(abs(b - a) for a, b in zip(ys, ys[1:]))  # noqa: E731
    assert wiggle(smoothed.get_ydata()) < 0.5 * wiggle(raw)
    assert ema([1.0, float("nan"), 1.0], 5) == [1.0, 1.0, 1.0]  # a non-finite loss does not poison the rest


def test_plot_step_axes_have_integer_ticks_and_a_tokens_axis_from_the_log(run_dir, tmp_path, monkeypatch):
    figures = drawn_figure(monkeypatch)
    plot_run(run_dir, tmp_path / "curves.png")
    [figure] = figures
    for ax in figure.axes:
        assert all(float(t).is_integer() for t in ax.xaxis.get_majorticklocs())
    steps, tokens = tokens_by_step(RunDir(run_dir).read_log(), run_dir / "config.json")
    assert steps[:3] == [0, 1, 2] and tokens[:3] == [0, 4096, 8192]  # tokens after n steps
    figure.canvas.draw()
    labels = [t.get_text() for t in figure.axes[0].child_axes[0].get_xticklabels() if t.get_text()]
    assert labels and all(label == "0" or label.endswith("k") for label in labels)  # e.g. 40.96k at step 10
    # without `tokens` in the log: total_batch_size from RUN/config.json
    run = tmp_path / "plain"
    write_log(run, [{"step": s, "train_loss": 5.0} for s in range(3)])
    (run / "config.json").write_text(json.dumps({"total_batch_size": 524288}))
    assert tokens_by_step(RunDir(run).read_log(), run / "config.json") == ([0, 1], [0, 524288])


def test_plot_marks_where_a_resumed_run_took_over(tmp_path, monkeypatch):
    records = [{"step": s, "train_loss": 5.0 - 0.1 * s, "elapsed_s": 1.0 + s} for s in range(10)]
    records[6:] = [{**r, "elapsed_s": r["elapsed_s"] - 6.5} for r in records[6:]]  # a new invocation from step 6
    records += [{"step": 8, "train_loss": 4.3, "elapsed_s": 9.0}, {"step": 9, "train_loss": 4.2, "elapsed_s": 10.0}]  # 8 again
    write_log(tmp_path / "run", records)
    assert resume_steps(records) == [6, 8]
    figures = drawn_figure(monkeypatch)
    plot_run(tmp_path / "run", tmp_path / "curves.png")
    [figure] = figures
    for ax in figure.axes:
        marks = [line for line in ax.get_lines() if line.get_label() in ("resumed", "_resumed")]
        assert sorted(line.get_xdata()[0] for line in marks) == [6, 8]
    assert "resumed" in [t.get_text() for t in figure.axes[0].get_legend().get_texts()]


def test_plot_cli_draws_validation_loss_baselines_and_refuses_a_bad_one(run_dir, tmp_path, monkeypatch, capsys):
    figures = drawn_figure(monkeypatch)
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "b.png"), "--baseline", "3.2924", "GPT-2 124M on FineWeb-Edu",
                 "--baseline", "3.0", "mine"]) == 0
    lines = labelled_lines(figures[0].axes[0])
    assert list(lines["GPT-2 124M on FineWeb-Edu (3.2924)"].get_ydata()) == [3.2924, 3.2924]
    assert list(lines["mine (3.0000)"].get_ydata()) == [3.0, 3.0]
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "c.png"), "--baseline", "low", "GPT-2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "baseline" in err and not (tmp_path / "c.png").exists()


def test_plot_compare_draws_each_run_in_its_own_colour_with_its_name(tmp_path, monkeypatch):
    records = [r for r in training_log() if "hellaswag_acc" not in r]
    write_log(tmp_path / "sequential", records)
    write_log(tmp_path / "shuffled", [{**r, "val_loss": r["val_loss"] - 0.5} if "val_loss" in r else r for r in records])
    figures = drawn_figure(monkeypatch)
    assert main(["plot", str(tmp_path / "sequential"), "--compare", str(tmp_path / "shuffled"),
                 "--out", str(tmp_path / "both.png")]) == 0
    [figure] = figures
    lines = labelled_lines(figure.axes[0])
    smoothed = "train loss, smoothed (EMA over ~5 steps)"
    assert set(lines) == {f"{run}: {curve}" for run in ("sequential", "shuffled")
                          for curve in ("train loss", smoothed, "validation loss")}
    first, second = lines["sequential: validation loss"], lines["shuffled: validation loss"]
    assert first.get_color() != second.get_color()
    assert list(second.get_ydata()) == [pytest.approx(v - 0.5) for v in first.get_ydata()]
    assert set(labelled_lines(figure.axes[1])) == {"sequential: learning rate", "shuffled: learning rate"}
    assert "sequential vs shuffled" in figure.get_suptitle() and (tmp_path / "both.png").stat().st_size > 10_000


def test_plot_cli_with_log_steps_writes_into_the_run_by_default(run_dir, capsys):
    from PIL import Image

    assert main(["plot", str(run_dir), "--log-steps"]) == 0
    assert "curves.png" in capsys.readouterr().out
    with Image.open(run_dir / "curves.png") as image:
        image.load()
        assert image.size[0] > 500


def test_plot_draws_only_the_panels_the_log_has_data_for(tmp_path, monkeypatch):
    from PIL import Image

    figures = drawn_figure(monkeypatch)
    write_log(tmp_path / "run", [r for r in training_log() if "hellaswag_acc" not in r])
    plot_run(tmp_path / "run")
    assert [ax.get_title() for ax in figures[0].axes] == ["Loss", "Learning rate", "Throughput"]
    write_log(tmp_path / "bare", [{"step": s, "train_loss": 5.0 - 0.1 * s} for s in range(5)])
    with Image.open(plot_run(tmp_path / "bare")) as image:
        width, height = image.size
        assert width < 1.6 * height
    assert [ax.get_title() for ax in figures[1].axes] == ["Loss"]


def test_plot_reads_hellaswag_records_of_older_logs_as_token_normalised(tmp_path, monkeypatch):
    write_log(tmp_path / "old", [{"step": 0, "train_loss": 5.0}, {"step": 1, "train_loss": 4.0},
                                 {"step": 1, "hellaswag_acc": 0.26, "hellaswag_acc_norm": 0.27, "hellaswag_n": 10042}])
    figures = drawn_figure(monkeypatch)
    plot_run(tmp_path / "old")
    lines = labelled_lines(figures[0].axes[1])
    assert list(lines["acc_norm_tokens (completion style, per token)"].get_ydata()) == [0.27]
    assert "acc_norm (lm-eval, per character)" not in lines


def test_run_log_after_a_resume_keeps_the_latest_value_of_a_repeated_step(tmp_path):

    records = [{"step": 0, "train_loss": 5.0}, {"step": 1, "train_loss": 4.0}, {"step": 1, "train_loss": 3.5}]
    write_log(tmp_path, records, tail='{"step": 2, "train_lo')  # cut short mid-write
    assert series(RunDir(tmp_path).read_log(), "train_loss") == ([0, 1], [5.0, 3.5])


def test_a_malformed_line_inside_the_run_log_is_reported_with_its_line_number(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 0, "train_loss": 5.0}\nnot json\n{"step": 1, "train_loss": 4.0}\n')
    result = cli("plot", str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "log.jsonl:2" in result.stderr
