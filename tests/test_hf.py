import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, pipeline

from corpus import corpus, is_fixture
from gpt2repro import GPT, GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.hf.convert import gpt_from_hf, gpt_to_hf
from gpt2repro.hf.export import HF_FILES, save_hf
from gpt2repro.tokenizer import get_encoding

PROMPT = "Hello, I'm a language model,"


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, biases and LayerNorm gains included.

    At init biases are 0 and gains 1, and weights are so small that a wrong GELU variant or an
    unconverted bias moves the logits by less than 1e-5; with every value random, such mistakes
    move them by about 1e-3 while a correct conversion stays near 1e-6.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=generator)
            is_layernorm_gain = name.endswith("weight") and (".ln_" in name or "ln_f" in name)
            p.copy_(1 + noise if is_layernorm_gain else noise)
    return model


def tiny_hf_model(vocab_size=50257, seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return randomize_(GPT2LMHeadModel(config), seed).eval()


def tiny_gpt(seed=1) -> GPT:
    # vocabulary padded like a training run's; to_hf must crop it to GPT-2's 50,257
    return randomize_(GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=32)), seed).eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_from_hf_gives_the_same_logits_as_gpt2lmheadmodel():
    hf = tiny_hf_model()
    ours = gpt_from_hf(hf).eval()
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert logits.dtype == expected.dtype == torch.float32
    assert expected.std() > 0.5  # logits large enough for the 1e-5 bound to mean something
    assert max_abs_diff(logits, expected) < 1e-5


def test_hf_round_trip_preserves_every_tensor_exactly():
    hf = tiny_hf_model()
    back = gpt_to_hf(gpt_from_hf(hf))
    expected, got = hf.state_dict(), back.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()


def test_our_model_round_trips_through_hf_with_identical_logits():
    ours = tiny_gpt()
    hf = gpt_to_hf(ours)
    assert hf.config.vocab_size == 50257 and hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    back = gpt_from_hf(hf)
    original = ours.state_dict()
    assert back.state_dict().keys() == original.keys()
    for name, tensor in back.state_dict().items():
        padded_vocab = name in ("transformer.wte.weight", "lm_head.weight")
        assert torch.equal(tensor, original[name][:50257] if padded_vocab else original[name]), name
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = ours(idx)[0][..., :50257]
        hf_logits = hf(idx).logits
    assert hf_logits.std() > 0.5
    assert max_abs_diff(ours_logits, hf_logits) < 1e-5


def test_our_loss_on_a_padded_vocabulary_equals_transformers_loss_of_the_export():
    ours = tiny_gpt(seed=3)
    hf = gpt_to_hf(ours)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2))
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)
    with torch.no_grad():
        expected = hf(idx, labels=idx).loss  # transformers shifts the labels itself
        _, chunked = ours(idx, targets)
    assert abs(chunked.item() - expected.item()) < 1e-5 * expected.item()


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_gpt(seed=2)


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory) -> Path:
    metrics = {"val_loss": 3.28, "hellaswag_acc": 0.29, "hellaswag_acc_norm_tokens": 0.31, "hellaswag_acc_norm": 0.30,
               "hellaswag_n": 10042}
    return save_hf(model, tmp_path_factory.mktemp("export") / "tiny-gpt2", metrics=metrics)


def test_save_hf_writes_a_directory_transformers_loads_with_our_weights(model, export_dir):
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(HF_FILES)
    assert [p.name for p in export_dir.parent.iterdir()] == [export_dir.name]  # no temporary directory left
    hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    assert isinstance(hf, GPT2LMHeadModel)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_abs_diff(hf(idx).logits, model(idx)[0][..., :50257]) < 1e-5
    back = gpt_from_hf(export_dir)  # a local directory, as the command line passes it
    for name, tensor in back.state_dict().items():
        original = model.state_dict()[name]
        assert torch.equal(tensor, original[: tensor.shape[0]]), name
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256
    assert tokenizer.encode(PROMPT) == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_save_hf_output_generates_in_a_transformers_pipeline_like_our_greedy_generate(model, export_dir):
    generator = pipeline("text-generation", model=str(export_dir), device="cpu")
    ids = generator(PROMPT, max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = torch.tensor([get_encoding().encode(PROMPT)])
    assert ids == model.generate(prompt, 8, top_k=1)[0].tolist()
    text = generator(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text == get_encoding().decode(ids)


def test_model_card_has_hub_metadata_and_model_index_results(export_dir):
    card = (export_dir / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "mit" and "gpt2repro" in meta["tags"]
    assert "datasets" not in meta and "base_model" not in meta  # nothing known about the data; from scratch
    [entry] = meta["model-index"]
    assert entry["name"] == "tiny-gpt2"
    results = {(r["dataset"]["name"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert results == {
        ("HellaSwag", "acc"): 0.29, ("HellaSwag", "acc_norm_tokens"): 0.31, ("HellaSwag", "acc_norm"): 0.30,
        ("held-out validation split", "loss"): 3.28,
    }
    names = {m["type"]: m["name"] for r in entry["results"] for m in r["metrics"]}
    assert "lm-eval" in names["acc_norm"] and "completion style, token-normalised" in names["acc_norm_tokens"]
    assert all(r["task"]["type"] == "text-generation" for r in entry["results"])
    [hellaswag] = [r for r in entry["results"] if r["dataset"]["name"] == "HellaSwag"]
    assert hellaswag["dataset"]["type"] == "Rowan/hellaswag" and hellaswag["dataset"]["split"] == "validation"


def test_model_card_round_trips_through_huggingface_hub_with_training_facts(model, tmp_path):
    from huggingface_hub import ModelCard

    data = {"sources": ["HuggingFaceFW/fineweb-edu"], "name": "sample-10BT", "split": "train", "val_tokens": 100_000_000}
    out = save_hf(model, tmp_path / "hf", train_config={"max_steps": 19073, "total_batch_size": 524288},
                  metrics={"val_loss": 3.08, "hellaswag_acc_norm_tokens": 0.305, "hellaswag_acc_norm": 0.312},
                  model_name="gpt2-124M-fineweb", base_model="openai-community/gpt2", hardware="8 x NVIDIA H200",
                  metric_steps={"val_loss": 19073, "hellaswag_acc_norm_tokens": 19073, "hellaswag_acc_norm": 19073},
                  training={"step": 19073, "tokens_seen": 10_000_000_000, "world_size": 8}, data=data)
    card = ModelCard.load(out / "README.md")
    assert card.data.model_name == "gpt2-124M-fineweb" and card.data.base_model == "openai-community/gpt2"
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"] and card.data.license == "mit"
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("HuggingFaceFW/fineweb-edu", "loss"): 3.08, ("Rowan/hellaswag", "acc_norm_tokens"): 0.305,
                       ("Rowan/hellaswag", "acc_norm"): 0.312}
    for row in ("| tokens trained | 10,000,000,000 |", "| hardware | 8 x NVIDIA H200 |", "| processes (world size) | 8 |",
                "| val_loss | 3.0800 | 19,073 |", "max_steps: 19073", "trained further from [openai-community/gpt2]"):
        assert row in card.text, row


def test_exported_tokenizer_encodes_tiny_shakespeare_exactly_like_tiktoken(export_dir, tmp_path):
    path = corpus("tinyshakespeare.txt")
    text = path.read_text(encoding="utf-8")
    expected = get_encoding().encode_ordinary(text)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = tokenizer.encode(text)
    assert len(ids) == (90_685 if is_fixture(path) else 338_025)  # the 300 KB excerpt or the whole corpus
    assert ids == expected
    assert tokenizer.decode(ids) == text
    # tools that read the classic vocab.json + merges.txt pair must get the same tokenizer
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((export_dir / name).read_bytes())
    classic = GPT2Tokenizer.from_pretrained(tmp_path)
    assert classic.encode(text) == expected and classic.eos_token_id == 50256
    vocab = json.loads((export_dir / "vocab.json").read_text())
    merges = (export_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 50257 and len(merges) == 1 + 50000  # version header + 50,000 merges


def test_save_hf_replaces_an_earlier_export_but_never_a_directory_with_other_files(model, export_dir, tmp_path):
    small = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8))
    again = tmp_path / "again"
    again.mkdir()
    for name in HF_FILES:
        (again / name).write_bytes((export_dir / name).read_bytes())
    save_hf(small, again)
    assert json.loads((again / "config.json").read_text())["n_embd"] == 8
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "log.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match=r"already holds files that are not part of an export \(checkpoints, log.jsonl\)") as err:
        save_hf(small, run)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "log.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "run"]


def test_save_hf_interrupted_midway_leaves_no_directory_behind(tmp_path, monkeypatch):
    import gpt2repro.hf.export

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gpt2repro.hf.export, "write_tokenizer_files", fail)
    with pytest.raises(OSError, match="disk full"):
        save_hf(GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8)), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_non_gpt2_config_is_refused_in_one_line(tmp_path):
    hf = tiny_hf_model()
    hf.config.activation_function = "relu"
    with pytest.raises(UserError, match="not a GPT-2 config: activation_function 'relu'") as err:
        gpt_from_hf(hf)
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(UserError, match=r"is not a GPT-2 config: model_type is 'llama', not 'gpt2'") as err:
        gpt_from_hf(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_hub_id_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot download 'no-such-user/no-such-gpt2'") as err:
        gpt_from_hf("no-such-user/no-such-gpt2")
    assert "\n" not in str(err.value)


def test_a_directory_with_pickle_weights_only_is_refused_in_one_line(tmp_path):
    hf = tiny_hf_model()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # the old pickle format
    with pytest.raises(UserError, match="has no .safetensors weights; gpt2repro loads no pickle-based files") as err:
        gpt_from_hf(tmp_path)
    assert "\n" not in str(err.value)


def test_an_export_generates_in_a_pipeline_without_any_warning(export_dir, caplog, recwarn):
    import logging

    import transformers

    transformers.logging.enable_propagation()  # its warnings reach pytest's log capture
    try:
        with caplog.at_level(logging.WARNING):
            generator = pipeline("text-generation", model=str(export_dir), device="cpu")
            generator("Hello, I'm a language model,", max_new_tokens=4, do_sample=True, top_k=50)
    finally:
        transformers.logging.disable_propagation()
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]
    assert not logged and not [str(w.message) for w in recwarn], (transformers.__version__, logged)
