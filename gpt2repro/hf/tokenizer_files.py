"""GPT-2's tokenizer as transformers files (tokenizer.json, vocab.json, merges.txt, ...), generated
from the vendored BPE ranks with no download."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers import GPT2TokenizerFast

from ..config import EOT_TOKEN
from ..tokenizer import mergeable_ranks

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in vocab.json and merges.txt."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_parts(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates `token`: byte-pair encode it with the merges ranked before it."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"cannot recover the merge that forms token {token!r}")
    return parts[0], parts[1]


@functools.cache
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks = mergeable_ranks()
    to_char = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    merges = [
        tuple(text(part) for part in _merge_parts(token, ranks))
        for token, _ in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return vocab, merges


def build_hf_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's tokenizer as a `transformers` fast tokenizer, built with no download."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = vocab_and_merges()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,  # byte-level BPE decodes exactly; clean-up would drop spaces
    )


def write_tokenizer_files(out_dir: Path, model_max_length: int = 1024) -> None:
    tokenizer = build_hf_tokenizer()
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(out_dir)
    vocab, merges = vocab_and_merges()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
