"""Runs that never lose work: each test injects one fault and proves what gpt2repro does about it.

Tiny models on CPU. Training runs in-process where only the outcome matters, and in a subprocess
where the exit status or a signal is the point.
"""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from corpus import corpus
from gpt2repro import checkpoint
from gpt2repro.__main__ import main
from gpt2repro.checkpoint import latest_checkpoint, load_checkpoint, scan_checkpoints, verify_checkpoint
from gpt2repro.data import TokenLoader, prepare, read_manifest, verify_in_background
from gpt2repro.errors import UserError
from gpt2repro.model import GPT
from gpt2repro.train import EXIT_STOPPED_EARLY, Trainer, train
from helpers import SMALL, optimizer_for, shakespeare_data, small_config, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUIET = ["val_every=0", "sample_every=0"]  # training only: no evaluation or samples


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return shakespeare_data(tmp_path_factory)


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_command(data_dir: Path, run: Path, *settings: str) -> list[str]:
    return [sys.executable, "-m", "gpt2repro", "train", "--preset", "tiny", "--data", str(data_dir),
            "--out", str(run), "--set", *SMALL, *settings]


def run_train(data_dir: Path, run: Path, *settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(data_dir, run, *settings), env=cli_env(), capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records(run) if "train_loss" in r}


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path`, by relative name, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Damage a file in place, keeping its size (what bit rot or a bad copy does)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. every checkpoint damaged


def test_a_run_whose_every_checkpoint_is_corrupt_is_refused_in_one_line_and_left_untouched(data_dir, tmp_path):
    run = tmp_path / "run"
    train(small_config("max_steps=2", "checkpoint_every=1", *QUIET), data_dir, run)
    for weights in sorted((run / "checkpoints").glob("step_*/model.safetensors")):
        flip_byte(weights)
    before = snapshot(run)
    result = run_train(data_dir, run, "max_steps=4", "checkpoint_every=1", *QUIET)
    assert result.returncode == 2, result.stderr
    error = one_line(result.stderr)
    assert "every checkpoint" in error and "step_000001" in error and "step_000002" in error, error
    assert "pass a new --out" in error, error
    assert snapshot(run) == before  # log.jsonl, config.json and both checkpoints byte for byte


# ---------------------------------------------------------------------------------------------
# 2. pruning


def test_prune_keeps_damaged_checkpoints_and_the_one_just_written_even_below_damaged_higher_steps(tmp_path):
    model = GPT(small_config().model)
    optimizer = optimizer_for(model)
    root = tmp_path / "checkpoints"
    for step in (0, 1, 2, 3, 8, 9, 10):
        write_checkpoint(root, step, model, optimizer, {"step": step}, keep=100)
    flip_byte(root / "step_000000" / "model.safetensors")  # damaged at the same size, below the intact ones
    weights = root / "step_000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short
    flip_byte(root / "step_000009" / "optimizer.safetensors")  # damaged at the same size
    (root / "step_000010" / "manifest.json").unlink()  # never finished
    damaged = {"step_000000", "step_000008", "step_000009", "step_000010"}
    assert {p.name for p in scan_checkpoints(root)[1]} == damaged

    write_checkpoint(root, 4, model, optimizer, {"step": 4}, keep=2)
    names = {p.name for p in root.iterdir()}
    assert damaged <= names  # no damaged checkpoint is deleted, whatever its step
    assert {"step_000003", "step_000004"} <= names  # the newest two good ones, the one just written among them
    assert not names & {"step_000001", "step_000002"}
    write_checkpoint(root, 5, model, optimizer, {"step": 5}, keep=1)  # damaged ones at higher steps: 5 stays
    assert {p.name for p in root.iterdir()} == damaged | {"step_000005"}
    verify_checkpoint(root / "step_000005")


# ---------------------------------------------------------------------------------------------
# 3. configuration


def test_infinite_and_nan_settings_are_refused_in_one_line_naming_every_bad_key(tmp_path, capsys):
    common = ["train", "--preset", "tiny", "--data", str(tmp_path / "unused"), "--out", str(tmp_path / "run")]
    assert main(common + ["--set", "max_lr=inf", "min_lr=nan", "eps=-.inf"]) == 2
    error = one_line(capsys.readouterr().err)
    assert "max_lr" in error and "min_lr" in error and "eps" in error, error
    config = tmp_path / "bad.yaml"
    config.write_text("max_lr: .inf\nweight_decay: .nan\n")
    assert yaml.safe_load(config.read_text())["max_lr"] == float("inf")
    assert main(common + ["--config", str(config), "--set", "grad_clip=NaN"]) == 2
    error = one_line(capsys.readouterr().err)
    assert "max_lr" in error and "weight_decay" in error and "grad_clip" in error, error
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 4. weights that turn non-finite


def test_weights_poisoned_after_an_update_are_never_saved_and_the_named_checkpoint_is_good(data_dir, tmp_path,
                                                                                          monkeypatch):
    run = tmp_path / "run"
    original = Trainer.apply_update

    def poisoned(self, lr=None):
        result = original(self, lr)
        if self.step == 3:  # the fourth update; the save after step 4 follows at once
            with torch.no_grad():
                self.unwrapped.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        return result

    monkeypatch.setattr(Trainer, "apply_update", poisoned)
    with pytest.raises(UserError, match="non-finite") as err:
        train(small_config("max_steps=6", "checkpoint_every=2", *QUIET), data_dir, run)
    message = str(err.value)
    assert "\n" not in message and "nothing was saved" in message, message
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]  # no step_000004, no step_000004.tmp
    named = root / "step_000002"
    assert str(named) in message, message
    state = load_checkpoint(named, small_config().model)  # sha256-checked
    assert all_finite(state["model"].values())
    assert all_finite(v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v))
    for weights in root.rglob("*.safetensors"):
        assert all_finite(load_file(weights).values()), weights


# ---------------------------------------------------------------------------------------------
# 5. half-made checkpoint directories


def test_checkpoints_without_manifest_or_with_an_empty_manifest_are_skipped_on_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    settings = ("checkpoint_every=2", *QUIET)
    train(small_config("max_steps=2", *settings), data_dir, run)
    root = run / "checkpoints"
    bare = root / "step_000003"
    shutil.copytree(root / "step_000002", bare)
    (bare / "manifest.json").unlink()
    (bare / "trainer_state.json").unlink()
    empty = root / "step_000004"
    shutil.copytree(root / "step_000002", empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "files": {}}))
    intact, damaged = scan_checkpoints(root)
    assert list(intact) == [2] and set(damaged) == {bare, empty}

    trainer = train(small_config("max_steps=4", *settings), data_dir, run)
    assert trainer.resumed_from == root / "step_000002"
    assert sorted(losses(run)) == [0, 1, 2, 3]
    assert json.loads((root / "step_000004" / "trainer_state.json").read_text())["step"] == 4  # rewritten whole
    verify_checkpoint(root / "step_000004")


# ---------------------------------------------------------------------------------------------
# 6. a log cut off mid-line


def test_a_torn_last_log_line_is_dropped_when_resuming_and_plot_still_works(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    settings = ("max_steps=4", "checkpoint_every=2", *QUIET)
    train(small_config(*settings, "stop_after_steps=2"), data_dir, run)
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 2, "train_loss": 10.5, "lr"')  # a crash mid-write: half an object, no newline
    assert main(["plot", str(run), "--out", str(tmp_path / "before.png")]) == 0  # reads past the torn line
    train(small_config(*settings), data_dir, run)
    text = (run / "log.jsonl").read_text()
    assert text.endswith("\n") and '"lr"{' not in text and '"lr"\n' not in text
    assert [r["step"] for r in records(run) if "train_loss" in r] == [0, 1, 2, 3]  # every line parses
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# 7. a full disk


def test_a_full_disk_during_a_save_fails_in_one_line_and_leaves_the_earlier_checkpoints_intact(data_dir, tmp_path,
                                                                                               monkeypatch):
    run = tmp_path / "run"
    root = run / "checkpoints"
    settings = ("max_steps=4", "checkpoint_every=2", *QUIET)
    train(small_config(*settings, "stop_after_steps=2"), data_dir, run)
    earlier = snapshot(root)
    original = checkpoint.save_file

    def disk_fills_up(tensors, filename, metadata=None):
        if Path(filename).parent.name != "step_000004.tmp":
            return original(tensors, filename, metadata=metadata)
        data = safetensors_bytes(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(checkpoint, "save_file", disk_fills_up)
    with pytest.raises(UserError) as err:
        train(small_config(*settings), data_dir, run)
    message = str(err.value)
    assert "\n" not in message and "no space left" in message and "step_000004" in message, message
    assert "needs about" in message and "bytes" in message, message  # the room the save needed
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]  # no step_000004.tmp
    assert snapshot(root) == earlier
    verify_checkpoint(root / "step_000002")
    monkeypatch.undo()
    trainer = train(small_config(*settings), data_dir, run)  # room again: the same command finishes
    assert trainer.finished and trainer.resumed_from == root / "step_000002"


# ---------------------------------------------------------------------------------------------
# 8. SIGTERM and stop_after_steps


def test_sigterm_exits_75_with_a_checkpoint_and_the_rerun_resumes_and_stop_after_steps_exits_75(data_dir, tmp_path):
    run = tmp_path / "run"
    settings = ("max_steps=10000", "checkpoint_every=0", *QUIET)
    process = subprocess.Popen(train_command(data_dir, run, *settings), env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO)
    log, deadline = run / "log.jsonl", time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_STOPPED_EARLY == 75, output[-3000:]
    assert "SIGTERM" in output and "rerun the same command to resume" in output
    (step, path), = checkpoint.list_checkpoints(run / "checkpoints").items()
    load_checkpoint(path)
    assert max(losses(run)) == step - 1

    rerun = run_train(data_dir, run, *settings, "stop_after_steps=1")
    assert rerun.returncode == 75, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from {path} at step {step}" in rerun.stdout
    assert f"stopped after step {step + 1} (stop_after_steps=1)" in rerun.stdout
    assert sorted(losses(run)) == list(range(step + 1))
    assert step + 1 in checkpoint.list_checkpoints(run / "checkpoints")


# ---------------------------------------------------------------------------------------------
# 9. the final evaluation


def test_the_final_evaluation_follows_the_last_update_and_reaches_the_model_card(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(small_config("max_steps=3", "val_every=2", "sample_every=0", "checkpoint_every=0"), data_dir, run)
    evaluations = [r for r in records(run) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 3]  # 3 = max_steps: after the last update
    final = evaluations[-1]["val_loss"]
    assert final != evaluations[-2]["val_loss"]
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    (loss,) = [m for r in meta["model-index"][0]["results"] for m in r["metrics"] if m["type"] == "loss"]
    assert loss["value"] == pytest.approx(final, rel=1e-12)
    (row,) = [line for line in card.splitlines() if line.startswith("| val_loss |")]
    assert f"{final:.4f}" in row, row
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    assert "3" in cells[2:] or re.search(r"\bstep 3\b", row), row  # with the step it was measured at


# ---------------------------------------------------------------------------------------------
# 10. devices and prompts


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_eval_on_cuda_without_cuda_fails_in_one_line(data_dir, tmp_path, capsys):
    model = tmp_path / "model"
    checkpoint.save_model_dir(model, small_config().model, GPT(small_config().model).state_dict())
    assert main(["eval", "--model", str(model), "--device", "cuda", "--data", str(data_dir)]) == 2
    error = one_line(capsys.readouterr().err)
    assert error.startswith("gpt2repro eval: error: cannot use device") and "cuda" in error, error


@pytest.mark.parametrize("prompt", ["", "<|endoftext|>", "ROMEO:<|endoftext|>JULIET:"])
def test_an_empty_prompt_or_one_holding_endoftext_trains_and_samples(data_dir, tmp_path, prompt):
    run = tmp_path / "run"
    cfg = small_config("max_steps=1", "warmup_steps=1", "checkpoint_every=0", "val_every=0", "sample_every=1")
    cfg.sample_prompt = prompt
    assert train(cfg, data_dir, run).finished
    samples = (run / "samples.txt").read_text()
    assert samples.startswith("step 0: rank 0 sample 0: ") and "step 1: rank 0 sample 0: " in samples


# ---------------------------------------------------------------------------------------------
# 11. kill -9 while a checkpoint is being written


def test_kill_9_during_a_save_leaves_a_loadable_checkpoint_and_the_rerun_ends_with_the_same_losses(data_dir,
                                                                                                  tmp_path):
    settings = ("max_steps=6", "checkpoint_every=1", "keep_checkpoints=2", *QUIET)
    reference = run_train(data_dir, tmp_path / "straight", *settings)
    assert reference.returncode == 0, reference.stderr[-3000:]

    seed = random.randrange(1 << 30)
    target = random.Random(seed).randint(2, 5)  # the save after this step is interrupted
    run = tmp_path / "killed"
    root = run / "checkpoints"
    process = subprocess.Popen(train_command(data_dir, run, *settings), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=REPO)
    killed_at, deadline = None, time.time() + 300
    while killed_at is None and process.poll() is None and time.time() < deadline:
        if root.is_dir():
            writing = [p for p in root.iterdir() if p.name.endswith(".tmp") and int(p.name[5:11]) >= target]
            if writing:
                process.send_signal(signal.SIGKILL)
                killed_at = writing[0]
        time.sleep(0.0005)
    process.wait(timeout=60)
    assert killed_at is not None, f"no save after step {target} was seen in flight (seed {seed})"
    assert process.returncode == -signal.SIGKILL

    intact, damaged = scan_checkpoints(root)
    assert intact and not damaged, (seed, intact, damaged)  # a .tmp directory is neither
    newest = latest_checkpoint(root)
    assert newest.name < killed_at.name[:-4] or not killed_at.exists(), (seed, newest, killed_at)
    load_checkpoint(newest, small_config().model)

    rerun = run_train(data_dir, run, *settings)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {newest}" in rerun.stdout, (seed, rerun.stdout[-2000:])
    assert losses(run) == losses(tmp_path / "straight"), seed  # bit-identical on CPU
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# data: manifest names, a corpus too small to train on, background sha256 checks


@pytest.mark.parametrize("name", ["/etc/passwd", "../train_000000.npy", "sub/train_000000.npy", "..",
                                  "sub\\train_000000.npy", ""])
def test_a_manifest_naming_a_file_outside_its_directory_is_refused_in_one_line(data_dir, tmp_path, name):
    copy = tmp_path / "data"
    copy.mkdir()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["shards"][-1]["file"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a plain file name inside") as err:
        read_manifest(copy)
    assert "\n" not in str(err.value) and repr(name) in str(err.value)


def test_prepare_with_no_more_tokens_than_val_tokens_is_refused_naming_both_numbers(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text(corpus("tinyshakespeare.txt").read_text()[:2000])
    out = tmp_path / "data"
    assert main(["prepare", "--source", str(text), "--out", str(out), "--val-tokens", "4096", "--workers", "1"]) == 2
    error = one_line(capsys.readouterr().err)
    tokens = read_manifest(out, require_complete=False)["shards"][0]["tokens"]
    assert 0 < tokens <= 4096
    assert f"hold {tokens:,} tokens, not more than --val-tokens 4,096" in error and "train split is empty" in error
    assert not read_manifest(out, require_complete=False)["complete"]  # marked incomplete: no loader reads it
    with pytest.raises(UserError, match="incomplete: its sources hold"):
        TokenLoader(out, "val", 1, 8)
    with pytest.raises(UserError, match="not more than --val-tokens"):  # rerunning says the same
        prepare([str(text)], out, val_tokens=4096, num_workers=1, progress=False)
    prepare([str(text)], out, val_tokens=256, num_workers=1, progress=False, overwrite=True)
    assert read_manifest(out)["complete"] and "refused" not in read_manifest(out)


def test_background_verification_names_a_shard_corrupted_in_place(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    manifest = read_manifest(copy)
    train_bytes = sum(e["bytes"] for e in manifest["shards"] if e["split"] == "train")
    assert verify_in_background(copy, "train").result(timeout=60) == train_bytes
    assert verify_in_background(copy).result(timeout=60) == sum(e["bytes"] for e in manifest["shards"])
    shard = copy / next(e["file"] for e in manifest["shards"] if e["split"] == "train")
    size = shard.stat().st_size
    tokens = np.load(shard, mmap_mode="r")
    offset = size - 2 * (tokens.size // 2)  # a token in the middle, not the .npy header
    flip_byte(shard, offset)
    assert shard.stat().st_size == size
    TokenLoader(copy, "train", 4, 32)  # the cheap checks at start see nothing wrong
    future = verify_in_background(copy, "train")
    with pytest.raises(UserError, match="is corrupt: its sha256 differs") as err:
        future.result(timeout=60)
    assert str(shard) in str(err.value) and "\n" not in str(err.value)
    assert verify_in_background(copy, "val").result(timeout=60) > 0  # the other split is fine
    shard.unlink()
    with pytest.raises(UserError, match="is missing"):
        verify_in_background(copy, "train").result(timeout=60)


def test_training_on_a_shard_corrupted_in_place_stops_in_one_line_before_its_first_checkpoint(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    manifest = read_manifest(copy)
    shard = copy / next(e["file"] for e in manifest["shards"] if e["split"] == "train")
    tokens = np.load(shard, mmap_mode="r+")
    tokens[tokens.size // 2] = (int(tokens[tokens.size // 2]) + 1) % 50000  # still a valid token id
    tokens.flush()
    del tokens
    result = run_train(copy, tmp_path / "run", "max_steps=4", "checkpoint_every=2", "val_every=0", "sample_every=0")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "is corrupt: its sha256 differs" in one_line(result.stderr) and "nothing was saved" in result.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))
