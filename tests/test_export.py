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
from gpt2repro.plot import plot_run
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
        records.append({"step": step, "train_loss": 10.9 - 0.1 * step, "lr": 6e-4, "grad_norm": 1.0,
                        "tokens_per_sec": 1e5, "mfu": 0.4, "ms": 100.0, "tokens": 4096 * (step + 1)})
        if step % 10 == 0 or step == steps - 1:
            records.append({"step": step, "val_loss": 11.0 - 0.1 * step})
        if step % 20 == 0 or step == steps - 1:
            records.append({"step": step, "hellaswag_acc": 0.25 + step / 1000, "hellaswag_acc_norm": 0.26 + step / 1000,
                            "hellaswag_n": 10042})
    return records


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with checkpoints at steps 20 and 30 and a log that goes on to step 39."""
    run = tmp_path_factory.mktemp("runs") / "run"
    cfg = TrainConfig.from_dict({"model": {"block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizer = optimizer_for(model, 0.1, 6e-4)
    for step in (20, 30):
        write_checkpoint(run / "checkpoints", step, model, optimizer,
                         {"step": step, "tokens_seen": 4096 * step, "config": cfg.to_dict()})
    write_log(run, training_log())
    return run


def test_export_of_a_checkpoint_carries_the_metrics_logged_up_to_its_step(run_dir, tmp_path):
    out = export_checkpoint(run_dir / "checkpoints" / "step_000020", tmp_path / "export")
    meta = front_matter((out / "README.md").read_text())
    results = {m["type"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    # step 20's HellaSwag and val loss, not the later step 39's
    assert results == {"acc": pytest.approx(0.27), "acc_norm": pytest.approx(0.28), "loss": pytest.approx(9.0)}
    card = (out / "README.md").read_text()
    assert "| step | 20 |" in card and "| hellaswag_n | 10042 |" in card
    assert "total_batch_size: 524288" in card  # the training config from trainer_state.json
    assert {p.name for p in out.iterdir()} == EXPORT_FILES


def test_export_of_a_run_takes_its_newest_checkpoint_and_loads_in_transformers(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert str(tmp_path / "export") in capsys.readouterr().out
    assert "| step | 30 |" in (tmp_path / "export" / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert hf.config.n_layer == 2 and hf.config.vocab_size == 50257


def test_export_of_a_directory_that_is_no_checkpoint_fails_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = cli("export", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "neither a gpt2repro checkpoint" in result.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    return export_checkpoint(run_dir, tmp_path_factory.mktemp("export") / "gpt2repro-tiny")


def test_push_dry_run_lists_every_export_file_and_a_card_whose_yaml_has_the_results(export_dir, capsys):
    assert main(["push", str(export_dir), "--repo-id", "someone/gpt2repro-tiny", "--private", "--dry-run"]) == 0
    out = capsys.readouterr().out
    header, _, card = out.partition("\nmodel card (README.md):\n")
    assert "would upload 9 files to private model repo someone/gpt2repro-tiny (revision main)" in header
    listed = {line.split()[0] for line in header.splitlines()[1:] if line.strip()}
    assert listed == EXPORT_FILES
    meta = front_matter(card)
    assert meta["model-index"][0]["name"] == "gpt2repro-tiny"
    hellaswag = next(r for r in meta["model-index"][0]["results"] if r["dataset"]["name"] == "HellaSwag")
    assert {m["type"]: m["value"] for m in hellaswag["metrics"]} == {"acc": pytest.approx(0.27), "acc_norm": pytest.approx(0.28)}  # step 20: the last before checkpoint 30


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


def test_plot_writes_a_png_that_decodes_with_both_panels(run_dir, tmp_path):
    from PIL import Image

    out = plot_run(run_dir, tmp_path / "curves.png")
    assert out.stat().st_size > 20_000
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        width, height = image.size
        assert image.format == "PNG" and width > 1.5 * height  # two panels side by side


def drawn_figure(monkeypatch):
    """Keeps the figure plot_run draws, for inspection after it is saved."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    return figures


def test_plot_draws_both_losses_hellaswag_and_the_gpt2_and_gpt3_reference_lines(run_dir, tmp_path, monkeypatch):
    figures = drawn_figure(monkeypatch)
    plot_run(run_dir, tmp_path / "curves.png", log_steps=True)
    [figure] = figures
    loss_ax, hellaswag_ax = figure.axes[:2]
    lines = {line.get_label(): line for ax in (loss_ax, hellaswag_ax) for line in ax.get_lines()}
    records = training_log()
    val_steps = [r["step"] for r in records if "val_loss" in r and r["step"] > 0]  # step 0 cannot sit on a log axis
    assert list(lines["validation loss"].get_xdata()) == val_steps
    assert list(lines["validation loss"].get_ydata()) == [pytest.approx(11.0 - 0.1 * s) for s in val_steps]
    assert list(lines["train loss"].get_xdata()) == list(range(1, 40))
    assert list(lines["acc_norm"].get_xdata()) == [20, 39] and "acc" in lines
    references = {label: line.get_ydata()[0] for label, line in lines.items() if "acc_norm (" in label}
    assert references == {"GPT-2 124M acc_norm (0.2955)": 0.2955, "GPT-3 Small (124M) acc_norm (0.337)": 0.337}
    for ax in (loss_ax, hellaswag_ax):
        assert ax.get_xscale() == "log" and ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert ax.get_legend() is not None
    assert "run" in figure.get_suptitle()


def test_plot_compare_draws_each_run_in_its_own_colour_with_its_name(tmp_path, monkeypatch):
    records = [r for r in training_log() if "hellaswag_acc" not in r]
    write_log(tmp_path / "sequential", records)
    write_log(tmp_path / "shuffled", [{**r, "val_loss": r["val_loss"] - 0.5} if "val_loss" in r else r for r in records])
    figures = drawn_figure(monkeypatch)
    assert main(["plot", str(tmp_path / "sequential"), "--compare", str(tmp_path / "shuffled"),
                 "--out", str(tmp_path / "both.png")]) == 0
    [figure] = figures
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert set(lines) == {f"{run}: {curve}" for run in ("sequential", "shuffled") for curve in ("train loss", "validation loss")}
    first, second = lines["sequential: validation loss"], lines["shuffled: validation loss"]
    assert first.get_color() != second.get_color()
    assert list(second.get_ydata()) == [pytest.approx(v - 0.5) for v in first.get_ydata()]
    assert "sequential vs shuffled" in figure.get_suptitle() and (tmp_path / "both.png").stat().st_size > 10_000


def test_plot_cli_with_log_steps_writes_into_the_run_by_default(run_dir, capsys):
    from PIL import Image

    assert main(["plot", str(run_dir), "--log-steps"]) == 0
    assert "curves.png" in capsys.readouterr().out
    with Image.open(run_dir / "curves.png") as image:
        image.load()
        assert image.size[0] > 500


def test_plot_without_hellaswag_records_draws_the_loss_panel_alone(tmp_path):
    from PIL import Image

    write_log(tmp_path / "run", [r for r in training_log() if "hellaswag_acc" not in r])
    with Image.open(plot_run(tmp_path / "run")) as image:
        width, height = image.size
        assert width < 1.6 * height


def test_run_log_after_a_resume_keeps_the_latest_value_of_a_repeated_step(tmp_path):

    records = [{"step": 0, "train_loss": 5.0}, {"step": 1, "train_loss": 4.0}, {"step": 1, "train_loss": 3.5}]
    write_log(tmp_path, records, tail='{"step": 2, "train_lo')  # cut short mid-write
    assert series(RunDir(tmp_path).read_log(), "train_loss") == ([0, 1], [5.0, 3.5])


def test_a_malformed_line_inside_the_run_log_is_reported_with_its_line_number(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 0, "train_loss": 5.0}\nnot json\n{"step": 1, "train_loss": 4.0}\n')
    result = cli("plot", str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "log.jsonl:2" in result.stderr
