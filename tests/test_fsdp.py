"""FSDP2 on two CPU processes (accelerate_configs/cpu_fsdp_2proc.yaml): sharded training equals one process,
its checkpoints resume under FSDP and in one process, and export to transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corpus import corpus
from gpt2repro.checkpoint import load_model
from gpt2repro.data import prepare
from gpt2repro.presets import load_train_config
from gpt2repro.train import EXIT_STOPPED_EARLY, Trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "seq_len=32",
         "micro_batch_size=4", "total_batch_size=512", "warmup_steps=2", "val_batches=4", "num_samples=1",
         "sample_max_new_tokens=8", "seed=7", "max_steps=6", "val_every=3", "sample_every=3", "checkpoint_every=3"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launcher(port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "accelerate_configs" / "cpu_fsdp_2proc.yaml"), "--main_process_port", str(port)]


def run(args: list[str], prefix: list[str] | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    command = (prefix or [sys.executable]) + args
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == expect, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def train_cli(data: Path, out: Path, *extra: str, fsdp_port: int | None = None, expect: int = 0):
    args = ["-m", "gpt2repro", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
            "--set", *SMALL, *extra]
    return run(args, launcher(fsdp_port) if fsdp_port else None, expect)


def records(out: Path, key: str) -> dict[int, float]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def assert_close(expected: dict, got: dict, rel: float = 1e-4) -> None:
    assert list(expected) == list(got)
    for step in expected:
        assert abs(got[step] - expected[step]) <= rel * abs(expected[step]), (step, expected[step], got[step])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = prepare([str(corpus("tinyshakespeare.txt"))], root / "data", val_tokens=4096, shard_size=100_000,
                   num_workers=1, progress=False)
    one = train_cli(data, root / "one")
    sharded = train_cli(data, root / "fsdp", fsdp_port=29571)
    # under the launcher each process exits EXIT_STOPPED_EARLY, which the launcher reports as 1
    stopped = train_cli(data, root / "resumed", "stop_after_steps=3", fsdp_port=29573, expect=1)
    assert f"exitcode  : {EXIT_STOPPED_EARLY}" in stopped.stderr
    train_cli(data, root / "resumed", fsdp_port=29575)
    train_cli(data, root / "moved", "stop_after_steps=3", fsdp_port=29577, expect=1)
    moved = train_cli(data, root / "moved")  # one process picks up the FSDP checkpoint
    return {"root": root, "data": data, "one": one, "fsdp": sharded, "moved": moved}


def test_fsdp_training_and_validation_losses_equal_one_process(runs):
    root = runs["root"]
    assert "distributed: FSDP" in runs["fsdp"].stdout and "distributed: NO" in runs["one"].stdout
    assert list(records(root / "one", "train_loss")) == list(range(6))
    assert_close(records(root / "one", "train_loss"), records(root / "fsdp", "train_loss"))
    assert list(records(root / "one", "val_loss")) == [0, 3, 6]
    assert_close(records(root / "one", "val_loss"), records(root / "fsdp", "val_loss"))


def test_fsdp_resume_reproduces_the_uninterrupted_fsdp_run_bit_for_bit(runs):
    root = runs["root"]
    assert records(root / "resumed", "train_loss") == records(root / "fsdp", "train_loss")
    assert records(root / "resumed", "val_loss") == records(root / "fsdp", "val_loss")


def test_a_checkpoint_written_under_fsdp_resumes_in_one_process(runs):
    root = runs["root"]
    assert "resumed from" in runs["moved"].stdout and "step_000003" in runs["moved"].stdout
    assert_close(records(root / "one", "train_loss"), records(root / "moved", "train_loss"))


def test_an_fsdp_checkpoint_exports_and_loads_in_transformers_with_the_same_logits(runs):
    from transformers import AutoModelForCausalLM

    checkpoint = runs["root"] / "fsdp" / "checkpoints" / "step_000006"
    run(["-m", "gpt2repro", "export", str(checkpoint), "--out", str(runs["root"] / "hf")])
    ours = load_model(checkpoint).eval()
    theirs = AutoModelForCausalLM.from_pretrained(runs["root"] / "hf").eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0][..., :50257], rtol=1e-5, atol=1e-5)


def test_fsdp_parameters_are_dtensors_and_resumed_optimizer_state_is_on_live_parameters(runs, tmp_path):
    run_dir = tmp_path / "probe"
    train_cli(runs["data"], run_dir, "stop_after_steps=3", fsdp_port=29579, expect=1)
    out = tmp_path / "report"
    run([str(REPO / "tests" / "fsdp_probe.py"), str(runs["data"]), str(run_dir), str(out), *SMALL,
         "mixed_precision=bf16"], launcher(29581))
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.{rank}").read_text())
        assert report["resumed_step"] == 3 and report["all_dtensors"] and report["moments_sharded"], report
        assert report["state_entries"] == report["parameters"] == report["entries_on_live_parameters"], report
        assert report["matmul_dtype"] == "torch.bfloat16", report  # autocast reaches the sharded model


def test_init_from_under_fsdp_starts_where_its_source_ended_and_trains_like_one_process(runs, tmp_path):
    source = runs["root"] / "one"
    start = (f"init_from={source}", "max_steps=2", "val_every=2", "sample_every=0", "checkpoint_every=2")
    sharded = train_cli(runs["data"], tmp_path / "fsdp", *start, fsdp_port=29583)
    train_cli(runs["data"], tmp_path / "one", *start)
    assert "distributed: FSDP" in sharded.stdout and "(init_from)" in sharded.stdout
    final = records(source, "val_loss")[6]
    assert abs(records(tmp_path / "fsdp", "val_loss")[0] - final) <= 1e-6 * final  # the source's weights, sharded
    assert_close(records(tmp_path / "one", "train_loss"), records(tmp_path / "fsdp", "train_loss"))
    assert_close(records(tmp_path / "one", "val_loss"), records(tmp_path / "fsdp", "val_loss"))


def test_fsdp_without_a_launcher_or_with_fsdp1_is_refused_in_one_line(tmp_path):
    for variables, fragment in (({"FSDP_VERSION": "2"}, "needs a process group"),
                                ({"FSDP_VERSION": "1"}, "only FSDP2 is supported")):
        result = subprocess.run(
            [sys.executable, "-m", "gpt2repro", "train", "--preset", "tiny", "--data", str(tmp_path), "--out",
             str(tmp_path / "run"), "--set", *SMALL], env={**ENV, "ACCELERATE_USE_FSDP": "true", **variables},
            capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert fragment in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("compile", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(compile):
    tokens = torch.randint(0, 50257, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    results = []
    for checkpointing in (False, True):
        cfg = load_train_config("tiny", None, SMALL + ["total_batch_size=128", f"compile={compile}",
                                                        f"activation_checkpointing={checkpointing}"])
        trainer = Trainer(cfg, data_dir=None, run_dir=None)
        calls = []
        for block in trainer.unwrapped.transformer.h:
            block.register_forward_pre_hook(lambda module, args: calls.append(module))
        loss = trainer.accumulate_gradients(batch)
        # checkpointing keeps each Block's input only and runs the Block again in backward
        assert len(calls) == (2 if checkpointing else 1) * cfg.model.n_layer
        results.append((loss, {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters()}))
    (loss, grads), (ac_loss, ac_grads) = results
    torch.testing.assert_close(ac_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(ac_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
