import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

from corpus import DATA_DIR as SHARED_DATA
from gpt2repro import GPT, GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.hf import HF_FILES, save_hf
from gpt2repro.tokenizer import get_encoding



def tiny_hf_model(vocab_size=50257, seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def test_from_hf_gives_the_same_logits_as_gpt2lmheadmodel():
    hf = tiny_hf_model()
    ours = GPT.from_hf(hf).eval()
    idx = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert (logits - expected).abs().max().item() < 1e-5


def test_hf_round_trip_preserves_every_tensor_exactly():
    hf = tiny_hf_model()
    back = GPT.from_hf(hf).to_hf()
    expected, got = hf.state_dict(), back.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_our_model_round_trips_through_hf_with_identical_logits_on_real_tokens():
    torch.manual_seed(1)
    ours = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=32)).eval()
    hf = ours.to_hf()
    assert hf.config.vocab_size == 50257 and hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    back = GPT.from_hf(hf)
    for name, tensor in back.state_dict().items():
        original = ours.state_dict()[name]
        assert torch.equal(tensor, original[: tensor.shape[0]] if "wte" in name or "lm_head" in name else original)
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        ours_logits = ours(idx)[0][..., :50257]
        hf_logits = hf(idx).logits
    assert (ours_logits - hf_logits).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=32))
    return save_hf(model, tmp_path_factory.mktemp("export") / "tiny-gpt2")


def test_save_hf_writes_a_directory_transformers_loads_and_generates_from(export_dir):
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(HF_FILES)
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    assert isinstance(model, GPT2LMHeadModel)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert tokenizer.eos_token_id == 50256
    generator = pipeline("text-generation", model=str(export_dir), device="cpu")
    out = generator("Hello, I'm a language model,", max_new_tokens=8, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("Hello, I'm a language model,") and len(text) > len("Hello, I'm a language model,")
    card = (export_dir / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: text-generation" in card


def test_exported_tokenizer_encodes_tiny_shakespeare_exactly_like_tiktoken(export_dir):
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = tokenizer.encode(text)
    assert len(ids) == 338_025
    assert ids == get_encoding().encode_ordinary(text)
    assert tokenizer.decode(ids) == text
    vocab = json.loads((export_dir / "vocab.json").read_text())
    merges = (export_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 50257 and len(merges) == 1 + 50000  # version header + 50,000 merges


def test_a_non_gpt2_config_is_refused_in_one_line(tmp_path):
    hf = tiny_hf_model()
    hf.config.activation_function = "relu"
    with pytest.raises(UserError, match="not a GPT-2 config: activation_function 'relu'") as err:
        GPT.from_hf(hf)
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(UserError, match="model_type"):
        GPT.from_hf(tmp_path)


def test_hub_id_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot download 'no-such-user/no-such-gpt2'") as err:
        GPT.from_hf("no-such-user/no-such-gpt2")
    assert "\n" not in str(err.value)
