import torch

from gpt2repro import GPT, GPTConfig
from gpt2repro.__main__ import main
from gpt2repro.eval.sample import TokenTextStream, stream_samples
from helpers import write_model_dir
from gpt2repro.tokenizer import get_encoding


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def test_streamed_text_holds_back_characters_split_across_tokens_until_complete():
    text = "naïve café 😀 世界 Ω≈ç√"
    enc = get_encoding()
    tokens = enc.encode(text)
    assert any(not _is_utf8(enc.decode_single_token_bytes(t)) for t in tokens)  # the text does split characters
    stream = TokenTextStream()
    pieces = [stream.push(t) for t in tokens] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_samples_stream_token_by_token_and_equal_the_decoded_generation():
    model = tiny_model()
    written = []
    samples = stream_samples(model, "Hello, I'm a language model,", num=2, max_new_tokens=12, seed=7, write=written.append)
    assert len(samples) == 2 and all(s.startswith("Hello, I'm a language model,") for s in samples)
    assert len(written) > 2 * 4  # a header, pieces as they come, a newline: not one write per sample
    assert "".join(written) == "[sample 1/2] " + samples[0] + "\n\n[sample 2/2] " + samples[1] + "\n"
    # the same draws without streaming: one generator seeded the same way, the samples one after another
    enc = get_encoding()
    generator = torch.Generator().manual_seed(7)
    prompt = torch.tensor([enc.encode("Hello, I'm a language model,")])
    expected = [enc.decode(model.generate(prompt, 12, top_k=50, generator=generator)[0].tolist(), errors="replace") for _ in range(2)]
    assert samples == expected


def test_sample_cli_prints_num_samples_reproducibly_from_a_checkpoint(tmp_path, capsys):
    write_model_dir(tiny_model(), tmp_path / "ckpt")
    args = ["sample", "--model", str(tmp_path / "ckpt"), "--prompt", "Hello", "--num", "3", "--max-new-tokens", "8", "--seed", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert [line.split("]")[0] for line in first.splitlines() if line.startswith("[sample")] == [
        "[sample 1/3", "[sample 2/3", "[sample 3/3"
    ]
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_sampling_encodes_the_prompt_once_then_one_token_per_step_from_the_kv_cache():
    model = tiny_model()
    forward_lengths = []
    hook = model.register_forward_pre_hook(lambda module, args: forward_lengths.append(args[0].shape[1]))
    try:
        stream_samples(model, "Hello, I'm a language model,", num=2, max_new_tokens=12, write=lambda text: None)
    finally:
        hook.remove()
    # per sample: the 8 prompt tokens once, then only the newest token for each of the 11 further steps
    assert forward_lengths == ([8] + [1] * 11) * 2


def test_sample_cli_flushes_each_piece_to_the_terminal_as_it_is_generated(tmp_path, monkeypatch):
    write_model_dir(tiny_model(), tmp_path / "ckpt")
    events = []

    class Terminal:
        def write(self, text):
            events.append(("write", text))

        def flush(self):
            events.append(("flush", None))

    monkeypatch.setattr("sys.stdout", Terminal())
    assert main(["sample", "--model", str(tmp_path / "ckpt"), "--prompt", "Hello", "--num", "1", "--max-new-tokens", "16"]) == 0
    writes = [i for i, (kind, _) in enumerate(events) if kind == "write"]
    assert len(writes) > 10  # the header, then piece by piece, not the whole sample at once
    assert all(i + 1 < len(events) and events[i + 1][0] == "flush" for i in writes)
