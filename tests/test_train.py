import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gpt2repro import checkpoint
from gpt2repro.__main__ import main
from gpt2repro.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from gpt2repro.config import GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.model import GPT
from gpt2repro.train import EXIT_STOPPED_EARLY, Trainer, get_lr, train
from helpers import SMALL, optimizer_for, shakespeare_data, small_config, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def model_keys(config: GPTConfig) -> set[str]:
    """The GPT's own parameter names; the output head is tied to wte and stored once."""
    return set(GPT(config).state_dict()) - {"lm_head.weight"}


def assert_plain_safetensors(path: Path) -> None:
    """An 8-byte header length, a JSON header of tensor offsets, and raw tensor bytes: nothing else."""
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    assert 8 + header_length + max(ends, default=0) == len(raw), path.name


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return shakespeare_data(tmp_path_factory)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def step_lines(output: str) -> list[str]:
    return re.findall(r"^step +\d+ \| loss .*$", output, flags=re.M)


def assert_same_losses(expected: dict[int, float], got: dict[int, float], steps: list[int]) -> None:
    """The same steps logged, each loss within 1e-4 relative (float32 sums in another order)."""
    assert list(expected) == list(got) == steps
    for step in steps:
        assert abs(expected[step] - got[step]) / expected[step] < 1e-4, step


def cpu_2proc_launcher(port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(port)]


def run_cli(*args: str, launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = (launcher or [sys.executable]) + ["-m", "gpt2repro", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_gradient_accumulation_matches_one_big_micro_batch():
    torch.manual_seed(0)
    tokens = torch.randint(0, 50257, (8, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = []
    for micro_batch, steps in ((8, 1), (2, 4)):
        cfg = small_config(f"micro_batch_size={micro_batch}", "total_batch_size=256", "grad_clip=0")
        trainer = Trainer(cfg, data_dir=None, run_dir=None)
        assert trainer.grad_accum_steps == steps
        before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
        loss = trainer.accumulate_gradients([(x[i:i + micro_batch], y[i:i + micro_batch]) for i in range(0, 8, micro_batch)])
        assert trainer.accelerator.sync_gradients  # the last micro-step syncs, so clipping sees the whole step
        grads = {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters()}
        trainer.apply_update()
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [get_lr(0, cfg)] * 2
        results.append((before, loss, grads, {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}))
    (before_a, loss_a, grads_a, after_a), (before_b, loss_b, grads_b, after_b) = results
    for name in before_a:
        assert torch.equal(before_a[name], before_b[name])  # same initial weights
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    for name in grads_a:
        assert (grads_b[name] - grads_a[name]).norm() <= 1e-6 * grads_a[name].norm(), name
    # Adam's first step is lr * g / (|g| + eps): where |g| is near eps (attention keys at init) it amplifies
    # float rounding of g, so the updates agree to 1e-3 of the learning rate rather than to 1e-6
    lr = get_lr(0, small_config())
    for name in after_a:
        update_a, update_b = after_a[name] - before_a[name], after_b[name] - before_a[name]
        assert update_a.abs().max() > 0.5 * lr  # the step really moved every tensor
        torch.testing.assert_close(update_b, update_a, rtol=1e-5, atol=1e-3 * lr)


def test_block_scope_compiles_one_graph_for_all_layers_with_the_eager_step():
    from torch._dynamo.utils import counters

    tokens = torch.randint(0, 50257, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    results = {}
    for scope, compile in (("eager", "false"), ("block", "true")):
        torch._dynamo.reset()
        counters.clear()
        cfg = small_config("model.n_layer=3", "total_batch_size=128", f"compile={compile}", "compile_scope=block")
        trainer = Trainer(cfg, data_dir=None, run_dir=None)
        loss = trainer.accumulate_gradients(batch)
        grads = {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters()}
        with torch.no_grad():
            val = trainer.model(*batch[0])[1]
        samples = trainer.hooks.sample(trainer.unwrapped)  # runs eager: the KV cache's growing lengths would each recompile
        results[scope] = loss, grads, val, samples, counters["stats"]["unique_graphs"]
    loss, grads, val, samples, graphs = results["block"]
    ref_loss, ref_grads, ref_val, ref_samples, _ = results["eager"]
    # the Block, the embedding and the loss head, each once for training and once for no-grad validation,
    # whatever the depth
    assert graphs == 6
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert samples == ref_samples
    assert [k for k in trainer.unwrapped.state_dict() if "_orig_mod" in k] == []


def test_the_step_is_a_cuda_graph_only_for_one_compiled_process_on_a_gpu_that_stops_on_non_finite_values():
    from gpt2repro.train.graph import graph_blocker

    gpu = torch.device("cuda", 0)
    cfg = small_config("compile=true")
    assert cfg.cuda_graph  # the default
    assert graph_blocker(cfg, gpu, 1) is None
    assert "process" in graph_blocker(cfg, gpu, 2)
    assert "CUDA GPU" in graph_blocker(cfg, torch.device("cpu"), 1)
    for setting, reason in (("on_nonfinite=skip", "skip"), ("activation_checkpointing=true", "RNG state"),
                            ("compile=false", "RNG state"), ("cuda_graph=false", "cuda_graph=false")):
        assert reason in graph_blocker(small_config("compile=true", setting), gpu, 1), setting
    trainer = Trainer(small_config(), data_dir=None, run_dir=None)
    assert trainer.graph is None and trainer.graph_blocker == "not on a CUDA GPU"


def test_resumed_run_logs_bit_identical_losses(data_dir, tmp_path):
    common = ("max_steps=6", "checkpoint_every=2", "val_every=3", "sample_every=3", "keep_checkpoints=2",
              "pin_checkpoints=[2]")
    train(small_config(*common), data_dir, tmp_path / "straight")
    train(small_config(*common, "stop_after_steps=3"), data_dir, tmp_path / "resumed")
    assert sorted(list_checkpoints(tmp_path / "resumed" / "checkpoints")) == [2, 3]
    assert max(losses(tmp_path / "resumed")) == 2
    resumed_trainer = train(small_config(*common), data_dir, tmp_path / "resumed")
    # a restart from scratch would log the same losses: make sure this one continued from step 3
    assert resumed_trainer.resumed_from == tmp_path / "resumed" / "checkpoints" / "step_000003"
    # the newest two are kept, and step 2 because it is pinned; step 3 went when step 6 was written
    assert sorted(list_checkpoints(tmp_path / "resumed" / "checkpoints")) == [2, 4, 6]
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert list(straight) == list(range(6))
    assert resumed == straight  # exact float equality, every step
    assert val_losses(tmp_path / "resumed") == val_losses(tmp_path / "straight")
    assert list(val_losses(tmp_path / "straight")) == [0, 3, 6]  # 6: after the last update


@pytest.mark.parametrize("compile", ["false", "true"])  # true: DDP around compiled blocks
def test_two_cpu_processes_log_the_same_losses_as_one(data_dir, tmp_path, compile):
    settings = ["--preset", "tiny", "--data", str(data_dir), "--set", *SMALL, "max_steps=4", "val_every=2",
                "sample_every=0", "checkpoint_every=0", f"compile={compile}"]
    single = run_cli("train", "--out", str(tmp_path / "one"), *settings)
    launcher = cpu_2proc_launcher(29517 if compile == "false" else 29521)
    double = run_cli("train", "--out", str(tmp_path / "two"), *settings, launcher=launcher)
    for run, world_size in (("one", 1), ("two", 2)):
        state = json.loads((tmp_path / run / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
        assert state["world_size"] == world_size and len(state["rng"]) == world_size  # one RNG state per rank
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert_same_losses(one, two, [0, 1, 2, 3])
    assert list(val_losses(tmp_path / "one")) == list(val_losses(tmp_path / "two")) == [0, 2, 4]  # 4: after the last update
    for step, loss in val_losses(tmp_path / "one").items():
        assert abs(loss - val_losses(tmp_path / "two")[step]) / loss < 1e-4
    assert len(step_lines(single.stdout)) == len(step_lines(double.stdout)) == 4  # rank 0 alone prints
    with safe_open(tmp_path / "two" / "checkpoints" / "step_000004" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == model_keys(small_config().model)  # saved unwrapped: no "module." prefix


def test_a_checkpoint_written_by_two_processes_resumes_in_one_with_the_same_losses(data_dir, tmp_path):
    settings = ["--preset", "tiny", "--data", str(data_dir), "--set", *SMALL, "max_steps=4", "val_every=0",
                "sample_every=0", "checkpoint_every=0"]
    launcher = cpu_2proc_launcher(29519)
    stopped = run_cli("train", "--out", str(tmp_path / "moved"), *settings, "stop_after_steps=2", launcher=launcher,
                      check=False)
    # each process exits with EXIT_STOPPED_EARLY; the launcher reports any non-zero exit of its processes as 1
    assert stopped.returncode == 1 and f"exitcode  : {EXIT_STOPPED_EARLY}" in stopped.stderr, stopped.stderr[-3000:]
    assert "stopped after step 2" in stopped.stdout
    state = json.loads((tmp_path / "moved" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    resumed = run_cli("train", "--out", str(tmp_path / "moved"), *settings)
    assert "resumed from" in resumed.stdout and "step_000002" in resumed.stdout
    run_cli("train", "--out", str(tmp_path / "one"), *settings)
    one, moved = losses(tmp_path / "one"), losses(tmp_path / "moved")
    assert_same_losses(one, moved, [0, 1, 2, 3])


def test_two_machine_ranks_of_multi_node_yaml_train_as_one_job(data_dir, tmp_path):
    """multi_node.yaml's rendezvous, with each "machine" a CPU process on this host: one 2-process job."""
    import yaml

    config = yaml.safe_load((REPO / "accelerate_configs" / "multi_node.yaml").read_text())
    config.update(use_cpu=True, mixed_precision="no")
    config.pop("gpu_ids")
    config_file = tmp_path / "multi_node_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    settings = ["--preset", "tiny", "--data", str(data_dir), "--set", *SMALL, "max_steps=3", "val_every=2",
                "sample_every=0", "checkpoint_every=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    logs = [(tmp_path / f"machine{rank}.out", tmp_path / f"machine{rank}.err") for rank in (0, 1)]
    machines = []
    for rank, (out, err) in enumerate(logs):  # files, not pipes: neither launcher can block on a full pipe
        with open(out, "w") as stdout, open(err, "w") as stderr:
            machines.append(subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", "29541",
                 "-m", "gpt2repro", "train", "--out", str(tmp_path / "nodes"), *settings],
                env=env, cwd=REPO, stdout=stdout, stderr=stderr, text=True,
            ))
    codes = [machine.wait(timeout=600) for machine in machines]
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    state = json.loads((tmp_path / "nodes" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert len(step_lines(outputs[0][0])) == 3 and not step_lines(outputs[1][0])  # global rank 0 alone prints
    run_cli("train", "--out", str(tmp_path / "one"), *settings)
    one, nodes = losses(tmp_path / "one"), losses(tmp_path / "nodes")
    assert_same_losses(one, nodes, [0, 1, 2])


def test_run_directory_holds_log_samples_checkpoints_and_exports_to_a_pipeline(data_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--preset", "tiny", "--data", str(data_dir), "--out", str(run),
                     "--set", *SMALL, "max_steps=3", "sample_every=2", "checkpoint_every=2")
    lines = step_lines(result.stdout)
    assert [int(line.split()[1]) for line in lines] == [0, 1, 2]
    for line in lines:
        assert re.search(r"\| lr [\d.e+-]+ \| norm [\d.]+ \| +[\d.]+ ms \| +[\d,]+ tok/s .*\| ETA \d+m\d\ds", line), line
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    step_record = next(r for r in records if "train_loss" in r)
    assert {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= step_record.keys()
    assert any("val_loss" in r for r in records)
    assert "Hello, I'm a language model," in (run / "samples.txt").read_text()
    assert sorted(list_checkpoints(run / "checkpoints")) == [2, 3]
    run_cli("export", str(run / "checkpoints" / "step_000003"), "--out", str(tmp_path / "hf"))
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    text = generator("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_tensorboard_tracker_receives_the_logged_losses(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(small_config("max_steps=3", "log_with=tensorboard", "val_every=2", "sample_every=0"), data_dir, run)
    accumulator = EventAccumulator(str(run / "tensorboard" / "gpt2repro"))  # RUN/tensorboard/<wandb_project>
    accumulator.Reload()
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_loss"):
        expected = [(r["step"], r[key]) for r in logged if key in r]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in accumulator.Scalars(key)] == expected


def test_a_tracker_that_is_not_installed_is_refused_in_one_line(monkeypatch):
    from gpt2repro.train import launch as train_module

    monkeypatch.setitem(train_module.TRACKERS, "wandb", lambda: False)
    with pytest.raises(UserError, match="^log_with=wandb needs the wandb package: pip install wandb$"):
        Trainer(small_config("log_with=wandb"), data_dir=None, run_dir=None)


def test_checkpoint_holds_no_pickle_and_bad_checkpoints_fail_in_one_line(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(small_config("max_steps=4", "checkpoint_every=2", "val_every=0", "sample_every=0"), data_dir, run)
    path = latest_checkpoint(run / "checkpoints")
    assert path.name == "step_000004"
    assert {f.name for f in path.iterdir()} >= {"config.json", "model.safetensors", "optimizer.safetensors"}
    for file in path.iterdir():
        assert file.suffix in (".json", ".safetensors"), file.name
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            assert_plain_safetensors(file)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == model_keys(small_config().model)  # no "module." or "_orig_mod." prefix
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 512 and len(state["rng"]) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must load without pickle")

    cfg = small_config()
    model = GPT(cfg.model)
    optimizer = optimizer_for(model, cfg.weight_decay, cfg.max_lr)
    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
            patch.setattr(module, name, refuse)
        assert latest_checkpoint(run / "checkpoints") == path
        state = load_checkpoint(path, model.config)
        model.load_weights(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    with safe_open(path / "model.safetensors", "pt") as f:
        assert torch.equal(model.transformer.wte.weight, f.get_tensor("transformer.wte.weight"))
    assert len(optimizer.state) == len(list(model.parameters()))  # AdamW moments restored for every tensor

    other = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=3, n_head=2, n_embd=32))
    with pytest.raises(UserError, match="was written for") as err:
        load_checkpoint(path, other.config)
    assert "\n" not in str(err.value)
    # resuming the run with another shape: one line from the command, the checkpoint untouched
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(run),
                 "--set", *SMALL, "model.n_layer=3", "max_steps=6"]) == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and "was written for" in error and "n_layer=3" in error, error
    assert latest_checkpoint(run / "checkpoints") == path

    run_cli("export", str(path), "--out", str(tmp_path / "ok"))  # intact: exports
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = run_cli("export", str(path), "--out", str(tmp_path / "bad"), check=False)
    assert result.returncode != 0 and "corrupt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_only_the_newest_checkpoints_and_pinned_ones_are_kept(tmp_path):
    model = GPT(small_config().model)
    optimizer = optimizer_for(model)
    root = tmp_path / "checkpoints"
    for step in range(1, 7):
        write_checkpoint(root, step, model, optimizer, {"step": step}, keep=2, pinned=(1, 3))
    assert sorted(p.name for p in root.iterdir()) == [f"step_{s:06d}" for s in (1, 3, 5, 6)]


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    cfg = small_config()
    model = GPT(cfg.model)
    optimizer = optimizer_for(model, cfg.weight_decay, cfg.max_lr)
    root = tmp_path / "checkpoints"
    first = write_checkpoint(root, 1, model, optimizer, {"step": 1})
    files = {p.name: p.read_bytes() for p in first.iterdir()}
    original = checkpoint.io.write_json

    def crash_on_trainer_state(path, obj):
        if path.name == "trainer_state.json":
            raise KeyboardInterrupt  # as if the job were stopped between two files
        original(path, obj)

    monkeypatch.setattr(checkpoint.io, "write_json", crash_on_trainer_state)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(root, 2, model, optimizer, {"step": 2}, keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]  # the partial write is cleaned up
    assert {p.name: p.read_bytes() for p in first.iterdir()} == files
    assert latest_checkpoint(root) == first
    (root / "step_000002.tmp").mkdir()  # what a kill -9 mid-write leaves: never listed, replaced by the next save
    assert latest_checkpoint(root) == first
    write_checkpoint(root, 2, model, optimizer, {"step": 2}, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]


def test_truncated_checkpoint_is_ignored_in_favour_of_the_previous(data_dir, tmp_path):
    run = tmp_path / "run"
    train(small_config("max_steps=4", "checkpoint_every=2", "val_every=0", "sample_every=0"), data_dir, run)
    root = run / "checkpoints"
    newest = root / "step_000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # as if cut off mid-write
    (root / "step_000006.tmp").mkdir()  # an interrupted write never counts
    assert latest_checkpoint(root) == root / "step_000002"
    # resuming continues from step 2 and rewrites the damaged step 4
    trainer = train(small_config("max_steps=4", "checkpoint_every=2", "val_every=0", "sample_every=0"), data_dir, run)
    assert trainer.resumed_from == root / "step_000002"
    assert latest_checkpoint(root) == newest
    assert json.loads((newest / "trainer_state.json").read_text())["step"] == 4


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = small_config("max_steps=6", "checkpoint_every=2", "val_every=0", "sample_every=0")
    original = Trainer.train_step

    def poisoned(self):
        if self.step == 3:  # weights turn non-finite during the fourth step
            with torch.no_grad():
                self.unwrapped.transformer.wte.weight[0, 0] = float("nan")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(UserError, match="non-finite loss nan .* at step 3; stopped without saving") as err:
        train(cfg, data_dir, run)
    assert "step_000002" in str(err.value)
    assert sorted(list_checkpoints(run / "checkpoints")) == [2]
    good = load_checkpoint(run / "checkpoints" / "step_000002", cfg.model)["model"]
    assert all(torch.isfinite(p).all() for p in good.values())


def test_skip_mode_skips_non_finite_steps_and_counts_them(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = small_config("max_steps=4", "checkpoint_every=0", "val_every=0", "sample_every=0", "on_nonfinite=skip")
    original = Trainer.apply_update
    weights_before_skip = {}

    def poisoned(self, lr=None):
        if self.step == 2:
            weights_before_skip.update({k: v.clone() for k, v in self.unwrapped.state_dict().items()})
            self.unwrapped.lm_head.weight.grad[0, 0] = float("inf")
        result = original(self, lr)
        if self.step == 2:
            for k, v in self.unwrapped.state_dict().items():
                assert torch.equal(v, weights_before_skip[k]), f"{k} changed in a skipped step"
        return result

    monkeypatch.setattr(Trainer, "apply_update", poisoned)
    train(cfg, data_dir, run)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [2]
    assert records[-1]["step"] == 3 and "skipped" not in records[-1]
    state = json.loads((run / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2repro", "train", "--preset", "tiny", "--data", str(data_dir), "--out", str(run),
         "--set", *SMALL, "max_steps=100000", "warmup_steps=10", "val_every=0", "sample_every=0", "checkpoint_every=0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    log = run / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, process.stdout.read() if process.poll() else "timeout"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED_EARLY, output
    assert "stopped after step" in output and "SIGTERM" in output
    (step, path), = list_checkpoints(run / "checkpoints").items()
    assert max(losses(run)) == step - 1


def test_trackers_get_the_wandb_project_run_name_and_tags(data_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    calls = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, project, config=None, init_kwargs=None:
                        calls.append((project, config, init_kwargs)))
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None: None)
    train(small_config("max_steps=2", "log_with=tensorboard", "wandb_project=gpt2-small", "wandb_tags=[a, b]",
                       "val_every=0", "sample_every=0"), data_dir, tmp_path / "run")
    (project, config, init_kwargs), = calls
    assert project == "gpt2-small" and config["max_steps"] == 2
    assert init_kwargs == {"wandb": {"name": "run", "tags": ["a", "b"]}}  # the run directory's name by default


def test_output_to_a_file_has_plain_lines_and_no_progress_bar_frames(data_dir, tmp_path):
    result = run_cli("train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                     "--set", *SMALL, "max_steps=3", "val_every=0", "sample_every=0")
    assert "\r" not in result.stdout + result.stderr  # captured: neither is a terminal
    assert len(step_lines(result.stdout)) == 3


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded; `fail` makes uploads fail."""

    fail = False
    uploads: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type, exist_ok):
        assert repo_type == "model" and exist_ok

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message, run_as_future):
        from concurrent.futures import Future

        assert run_as_future  # training does not wait for the upload
        future = Future()
        if self.fail:
            future.set_exception(ConnectionError("the Hub is unreachable"))
        else:
            card = (Path(folder_path) / "README.md").read_text()
            FakeHfApi.uploads.append((repo_id, commit_message, sorted(p.name for p in Path(folder_path).iterdir()), card))
            future.set_result(type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})())
        return future


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.uploads, FakeHfApi.fail = [], False
    return FakeHfApi


def test_push_to_hub_uploads_each_checkpoints_export_in_the_background_and_the_final_one_last(
        data_dir, tmp_path, fake_hub):
    train(small_config("max_steps=4", "checkpoint_every=2", "val_every=2", "sample_every=0",
                       "push_to_hub=someone/tiny-gpt2", "hub_strategy=every_save"), data_dir, tmp_path / "run")
    assert [(repo, message) for repo, message, _, _ in fake_hub.uploads] == [
        ("someone/tiny-gpt2", "Upload GPT-2 model trained with gpt2repro (step_000002)"),
        ("someone/tiny-gpt2", "Upload GPT-2 model trained with gpt2repro (step_000004)")]
    files, card = fake_hub.uploads[-1][2], fake_hub.uploads[-1][3]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)  # the export directory
    assert "val_loss" in card  # the final evaluation, after the last update, is in the last card


def test_a_failed_upload_never_stops_training_and_a_missing_token_is_refused_before_it(
        data_dir, tmp_path, fake_hub, monkeypatch, capsys):
    import huggingface_hub

    fake_hub.fail = True
    trainer = train(small_config("max_steps=2", "val_every=0", "sample_every=0", "push_to_hub=someone/tiny-gpt2"),
                    data_dir, tmp_path / "run")
    assert trainer.finished and "the upload of step_000002 to someone/tiny-gpt2 failed" in capsys.readouterr().out
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "other"),
                 "--set", *SMALL, "push_to_hub=someone/tiny-gpt2"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "needs a Hugging Face token" in error
    assert not (tmp_path / "other" / "log.jsonl").exists()
