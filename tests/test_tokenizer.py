import hashlib

import pytest

from corpus import corpus, shared_file
from gpt2repro import tokenizer
from gpt2repro.errors import UserError
from gpt2repro.tokenizer import BPE_SHA256, bpe_path, get_encoding, read_bpe

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


def test_known_gpt2_token_ids():
    enc = get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode("hello <|endoftext|>", allowed_special="all") == [31373, 220, 50256]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_vendored_bpe_file_is_the_r50k_base_file():
    ranks = read_bpe(bpe_path())
    assert len(ranks) == 50256 and sorted(ranks.values()) == list(range(50256))
    assert BPE_SHA256 == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    vendored = bpe_path().read_bytes()
    assert hashlib.sha256(vendored).hexdigest() == BPE_SHA256
    if (shared := shared_file("gpt2.tiktoken")) is not None:  # the copy in ../shared/data, where there is one
        assert vendored == shared.read_bytes()


def test_encoding_equals_tiktokens_own_gpt2_encoding_built_from_the_vendored_file(tmp_path, monkeypatch):
    import tiktoken
    import tiktoken.load
    import tiktoken_ext.openai_public

    # tiktoken reads its download cache first and checks the file against its own expected hash
    cache_key = hashlib.sha1(R50K_URL.encode()).hexdigest()
    (tmp_path / cache_key).write_bytes(bpe_path().read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def no_network(url):
        raise AssertionError(f"tiktoken tried to download {url}: the cached file did not pass its hash check")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    reference = tiktoken.Encoding(**tiktoken_ext.openai_public.r50k_base())
    ours = get_encoding()
    assert ours.n_vocab == reference.n_vocab and ours.special_tokens_set == reference.special_tokens_set
    # tiktoken writes the split regex differently (possessive quantifiers); what must agree is the split
    texts = [
        corpus("tinyshakespeare.txt").read_text(encoding="utf-8"),
        "naïve café 😀 世界 1234567 it's we'll THEY'RE <|endoftext|>x",
        "a  b\t\tc \n\n  d\r\n",
        "trailing whitespace   ",
        " \u00a0\u2009x  ",
    ]
    for text in texts:
        assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all"), text[:40]


def test_corrupted_bpe_file_is_refused_in_one_line(tmp_path):
    corrupt = tmp_path / "gpt2.tiktoken"
    data = bytearray(bpe_path().read_bytes())
    data[100] ^= 0x01
    corrupt.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is corrupt: sha256") as err:
        read_bpe(corrupt)
    assert "\n" not in str(err.value)


@pytest.fixture
def corrupted_vendored_file(tmp_path, monkeypatch):
    corrupt = tmp_path / "gpt2.tiktoken"
    corrupt.write_bytes(bpe_path().read_bytes()[:-1000])  # cut short, as by a broken install
    monkeypatch.setattr(tokenizer, "bpe_path", lambda: corrupt)
    tokenizer.mergeable_ranks.cache_clear()
    tokenizer.get_encoding.cache_clear()
    yield corrupt
    tokenizer.mergeable_ranks.cache_clear()
    tokenizer.get_encoding.cache_clear()


def test_a_corrupted_vendored_file_stops_a_command_with_one_line_naming_it(corrupted_vendored_file, tmp_path, capsys):
    from gpt2repro import GPT, GPTConfig
    from gpt2repro.__main__ import main
    from helpers import write_model_dir

    with pytest.raises(UserError, match="is corrupt"):
        get_encoding()
    write_model_dir(GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8)), tmp_path / "ckpt")
    assert main(["sample", "--model", str(tmp_path / "ckpt"), "--num", "1", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"GPT-2 BPE file {corrupted_vendored_file} is corrupt" in err
