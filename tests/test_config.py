import math
import types

import pytest
import torch

from gpt2repro.__main__ import main
from gpt2repro.config import MODEL_PRESETS, GPTConfig, TrainConfig
from gpt2repro.errors import UserError
from gpt2repro.presets import TRAIN_PRESETS, load_train_config
from gpt2repro.train import get_lr


def test_gpt2_124m_preset_is_the_reference_recipe():
    cfg = load_train_config("gpt2-124M")
    assert cfg.total_batch_size == 2**19 and cfg.micro_batch_size == 64 and cfg.seq_len == 1024
    assert (cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == (6e-4, 6e-5, 715, 19073)
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert cfg.model == GPTConfig() and cfg.model.vocab_size == 50304
    assert cfg.mixed_precision == "bf16" and cfg.tf32 and cfg.compile
    assert (cfg.val_every, cfg.hellaswag_every, cfg.sample_every, cfg.checkpoint_every) == (250, 250, 250, 5000)
    assert cfg.grad_accum_steps(1) == 8 and cfg.grad_accum_steps(8) == 1
    gpt3 = load_train_config("gpt3-124M")
    assert (gpt3.seq_len, gpt3.micro_batch_size, gpt3.model.block_size) == (2048, 32, 2048)
    assert gpt3.total_batch_size == cfg.total_batch_size


def test_quickstart_presets_fit_their_data_and_compile_only_on_a_gpu():
    tiny, small = load_train_config("tiny"), load_train_config("small")
    assert tiny.grad_accum_steps(1) == small.grad_accum_steps(1) == 1  # many small steps
    assert 2 <= tiny.model.n_layer <= 4 and tiny.model.n_embd <= 256 and 64 <= tiny.seq_len <= 128
    assert not tiny.compile and small.compile  # a few CPU minutes must not go to compilation
    assert small.model.n_layer * small.model.n_embd > 4 * tiny.model.n_layer * tiny.model.n_embd
    quickstart_val_tokens = 32768  # scripts/quickstart.sh
    for cfg in (tiny, small):
        assert cfg.val_batches * cfg.micro_batch_size * (cfg.seq_len + 1) <= quickstart_val_tokens


def test_get_lr_follows_warmup_then_cosine_then_floor():
    cfg = TrainConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)
    assert get_lr(0, cfg) == pytest.approx(6e-4 / 10)
    assert get_lr(9, cfg) == pytest.approx(6e-4)  # warmup ends at max_lr
    assert get_lr(10, cfg) == pytest.approx(6e-4)  # cosine starts at max_lr
    assert get_lr(60, cfg) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half way: cos(pi/2) = 0
    assert get_lr(35, cfg) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi * 0.25)) * (6e-4 - 6e-5))
    assert get_lr(110, cfg) == pytest.approx(6e-5)
    assert get_lr(10_000, cfg) == pytest.approx(6e-5)


def test_overrides_apply_in_order_with_types_checked(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_lr: 1e-3\nmodel:\n  n_layer: 2\nshuffle: false\n")
    cfg = load_train_config("tiny", yaml_file, ["max_lr=2e-3", "model.n_embd=64", "hellaswag=null"])
    assert cfg.max_lr == 2e-3 and cfg.model.n_layer == 2 and cfg.model.n_embd == 64 and not cfg.shuffle
    assert cfg.hellaswag is None
    assert load_train_config("tiny", None, ["model=gpt2-medium", "seq_len=64"]).model.n_layer == 24
    with pytest.raises(UserError, match="max_steps must be int, got 'many'"):
        load_train_config("tiny", None, ["max_steps=many"])
    with pytest.raises(UserError, match="unknown config key 'max_lrr'"):
        load_train_config("tiny", None, ["max_lrr=1"])


def test_train_command_applies_preset_then_config_file_then_every_set(tmp_path, monkeypatch):
    import gpt2repro.train

    received = {}
    def train(cfg, data, out):
        received.update(cfg=cfg, data=data, out=out)
        return types.SimpleNamespace(finished=True)

    monkeypatch.setattr(gpt2repro.train, "train", train)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_lr: 1e-3\nmax_steps: 70\nmodel:\n  n_layer: 2\n")
    assert main(["train", "--preset", "tiny", "--data", "DATA", "--out", "RUN", "--config", str(yaml_file),
                 "--set", "max_lr=2e-3", "model.n_embd=64", "--set", "seed=5"]) == 0
    cfg = received["cfg"]
    assert (received["data"], received["out"]) == ("DATA", "RUN")
    assert (cfg.max_lr, cfg.max_steps, cfg.model.n_layer, cfg.model.n_embd, cfg.seed) == (2e-3, 70, 2, 64, 5)
    assert cfg.seq_len == load_train_config("tiny").seq_len  # untouched fields keep the preset's value


@pytest.mark.parametrize("args, fragment", [
    (["--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["--set", "max_lrr=1"], "unknown config key 'max_lrr'"),
    (["--set", "max_steps"], "--set expects key=value, got 'max_steps'"),
    (["--config", "no_such_file.yaml"], "config file no_such_file.yaml does not exist"),
    (["--set", "micro_batch_size=3"], "not a multiple of micro_batch_size * seq_len"),
], ids=["preset", "key", "malformed-set", "missing-yaml", "batch"])
def test_train_command_reports_a_bad_config_in_one_line(tmp_path, capsys, args, fragment):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), "--out", str(run), *args]) == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and fragment in error, error
    assert not run.exists()


def test_invalid_config_reports_every_problem_at_once():
    with pytest.raises(UserError) as err:
        load_train_config("tiny", None, ["seq_len=4096", "min_lr=1", "on_nonfinite=ignore", "model.n_head=3"])
    message = str(err.value)
    assert "\n" not in message
    for problem in ("seq_len 4096 exceeds", "min_lr", "on_nonfinite", "not divisible by model.n_head 3"):
        assert problem in message


def test_batch_that_does_not_divide_over_processes_is_refused():
    cfg = load_train_config("tiny")
    with pytest.raises(UserError, match=r"not divisible by micro_batch_size \* seq_len \* world_size = 8 \* 128 \* 3"):
        cfg.grad_accum_steps(3)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(UserError, match="unknown preset 'gpt5'; known: " + ", ".join(TRAIN_PRESETS)):
        load_train_config("gpt5")


def test_config_survives_a_dict_round_trip():
    cfg = load_train_config("gpt3-124M", None, ["pin_checkpoints=[5, 10]"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("preset, shape, max_lr, tokens_per_step", [
    ("gpt2-350M", "gpt2-medium", 3e-4, 2**19), ("gpt2-774M", "gpt2-large", 2.5e-4, 2**19),
    ("gpt2-1558M", "gpt2-xl", 2e-4, 2**20),
])
def test_larger_recipes_take_the_gpt3_settings_of_the_nearest_size(preset, shape, max_lr, tokens_per_step):
    cfg = TRAIN_PRESETS[preset]().validate()
    assert cfg.model == MODEL_PRESETS[shape]
    assert (cfg.max_lr, cfg.total_batch_size) == (max_lr, tokens_per_step)
    assert cfg.min_lr == pytest.approx(max_lr / 10, rel=1e-12)  # cosine to 10%
    assert cfg.warmup_steps * tokens_per_step == pytest.approx(375e6, rel=2e-3)  # 375M warmup tokens
    assert cfg.max_steps * tokens_per_step == pytest.approx(10e9, rel=2e-4)  # 10B tokens, one epoch
    assert cfg.grad_accum_steps(8) >= 1 and cfg.mixed_precision == "bf16" and cfg.hellaswag == "auto"


def test_a_near_miss_gets_a_suggestion_and_a_model_shape_given_as_preset_gets_the_set_to_use():
    with pytest.raises(UserError, match=r"unknown config key 'max_lrr' \(did you mean 'max_lr'\?\)"):
        load_train_config("tiny", None, ["max_lrr=1e-3"])
    with pytest.raises(UserError, match=r"unknown preset 'gpt2' \(gpt2 is a model shape: --set model=gpt2\)"):
        load_train_config("gpt2")
    with pytest.raises(UserError, match=r"unknown preset 'gpt2-124m' \(did you mean 'gpt2-124M'\?\)"):
        load_train_config("gpt2-124m")


def test_train_help_lists_every_preset_and_every_set_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert all(f"  {name}: " in text for name in TRAIN_PRESETS)
    assert all(key in text for key in ("model.n_layer", "activation_checkpointing", "wandb_tags", "on_nonfinite"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_bench_with_its_gpu_defaults_on_a_cpu_is_refused_in_one_line(capsys):
    assert main(["bench"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "no CUDA GPU here" in error and "64 x 1024" in error
