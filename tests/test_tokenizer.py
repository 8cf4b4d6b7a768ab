import pytest

from gpt2repro.errors import UserError
from gpt2repro.tokenizer import BPE_SHA256, bpe_path, get_encoding, read_bpe


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


def test_corrupted_bpe_file_is_refused_in_one_line(tmp_path):
    corrupt = tmp_path / "gpt2.tiktoken"
    data = bytearray(bpe_path().read_bytes())
    data[100] ^= 0x01
    corrupt.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is corrupt: sha256") as err:
        read_bpe(corrupt)
    assert "\n" not in str(err.value)
