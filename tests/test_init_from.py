"""init_from: training starts from a transformers GPT-2, one of our runs or an export; offline and on CPU."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2repro import GPT, GPTConfig
from gpt2repro.__main__ import main
from gpt2repro.checkpoint import latest_checkpoint, read_model_config
from gpt2repro.data import validation_batches
from gpt2repro.hf.export import export_checkpoint
from gpt2repro.train import train
from helpers import SMALL, optimizer_for, shakespeare_data, small_config, write_checkpoint

STEPS = ("max_steps=2", "val_every=2", "sample_every=0", "checkpoint_every=2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return shakespeare_data(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random GPT-2 of another shape than the config's (3 layers of width 48), as transformers saves it."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=48, n_layer=3, n_head=3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # every weight random, so a wrong conversion shows in the loss
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf") / "random-gpt2"
    model.save_pretrained(path, safe_serialization=True)
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def first_val_loss(run: Path) -> float:
    return next(r["val_loss"] for r in records(run) if "val_loss" in r and r["step"] == 0)


def test_step_zero_validation_loss_equals_transformers_loss_of_the_source_model(data_dir, hf_dir, tmp_path):
    cfg = small_config(f"init_from={hf_dir}", *STEPS)
    trainer = train(cfg, data_dir, tmp_path / "run")
    shape = trainer.cfg.model
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.block_size, shape.vocab_size) == (3, 48, 3, 64, 50304)
    assert cfg.model.n_layer == 2  # the caller's config is left as it was

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    windows = validation_batches(data_dir, cfg.micro_batch_size, cfg.seq_len, cfg.val_batches)
    with torch.no_grad():
        expected = sum(F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item() for x, y in windows) / len(windows)
    assert first_val_loss(tmp_path / "run") == pytest.approx(expected, rel=1e-5)

    trained = [r for r in records(tmp_path / "run") if "train_loss" in r]
    assert [r["step"] for r in trained] == [0, 1] and trained[0]["lr"] < cfg.max_lr  # fresh step counter and warmup
    state = json.loads((latest_checkpoint(tmp_path / "run" / "checkpoints") / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["tokens_seen"] == 2 * cfg.total_batch_size and state["base_model"] is None
    card = (export_checkpoint(tmp_path / "run", tmp_path / "hf") / "README.md").read_text()
    assert "trained further from the weights of `random-gpt2`" in card and "base_model" not in card


def test_a_run_started_from_another_run_starts_at_its_final_validation_loss(data_dir, tmp_path):
    train(small_config(*STEPS), data_dir, tmp_path / "first")
    final = max((r for r in records(tmp_path / "first") if "val_loss" in r), key=lambda r: r["step"])
    assert final["step"] == 2
    train(small_config(f"init_from={tmp_path / 'first'}", *STEPS), data_dir, tmp_path / "second")
    assert first_val_loss(tmp_path / "second") == final["val_loss"]  # the same weights on the same windows


def test_a_resumed_init_from_run_needs_neither_the_source_nor_a_download(data_dir, hf_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(hf_dir, source)
    common = (f"init_from={source}", "max_steps=4", "val_every=2", "sample_every=0", "checkpoint_every=2")
    train(small_config(*common, "stop_after_steps=2"), data_dir, tmp_path / "run")
    shutil.rmtree(source)  # a resumed run reads its own checkpoint, of the source's shape
    trainer = train(small_config(*common), data_dir, tmp_path / "run")
    assert trainer.resumed_from is not None and trainer.step == 4
    assert read_model_config(latest_checkpoint(tmp_path / "run" / "checkpoints")).n_layer == 3


def test_the_hub_model_a_run_started_from_becomes_the_cards_base_model(tmp_path):
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8))
    write_checkpoint(tmp_path / "run" / "checkpoints", 2, model, optimizer_for(model),
                     {"step": 2, "base_model": "gpt2", "config": {"init_from": "gpt2"}})
    card = (export_checkpoint(tmp_path / "run", tmp_path / "hf") / "README.md").read_text()
    assert "base_model: gpt2" in card and "trained further from [gpt2](https://huggingface.co/gpt2)" in card


@pytest.mark.parametrize("source, message", [
    ("openai-community/gpt2", "cannot download 'openai-community/gpt2' from the Hugging Face Hub (HF_HUB_OFFLINE"),
    ("no/such/dir", "is neither a local directory nor a Hugging Face Hub model id"),
])
def test_an_unusable_init_from_fails_in_one_line(data_dir, tmp_path, capsys, monkeypatch, source, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                 "--set", *SMALL, f"init_from={source}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
