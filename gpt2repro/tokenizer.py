"""GPT-2's byte-level BPE tokenizer, built offline from the vendored `gpt2.tiktoken` rank file.

The rank file is the one tiktoken itself downloads for `r50k_base` (== GPT-2); its sha256 is
checked on every load so a damaged install fails loudly instead of tokenising differently.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

import tiktoken

from .config import EOT_TOKEN
from .errors import UserError

TOKENIZER_ID = "gpt2"  # what manifests and checkpoints record
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation regex: contractions, letter runs, digit runs, punctuation runs, whitespace.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bpe_path():
    return resources.files("gpt2repro") / "assets" / "gpt2.tiktoken"


def read_bpe(path) -> dict[bytes, int]:
    """Token bytes -> rank from a `.tiktoken` file, after checking its sha256."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"GPT-2 BPE file {path} cannot be read ({e.strerror}); reinstall gpt2repro") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise UserError(f"GPT-2 BPE file {path} is corrupt: sha256 {digest[:12]}... != expected {BPE_SHA256[:12]}...")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def mergeable_ranks() -> dict[bytes, int]:
    """The vendored GPT-2 ranks (read and checked once per process)."""
    return read_bpe(bpe_path())


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """A `tiktoken.Encoding` identical to `tiktoken.get_encoding("gpt2")`, with no network access."""
    return tiktoken.Encoding(
        name=TOKENIZER_ID,
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=mergeable_ranks(),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


def encode_prompt(text: str) -> list[int]:
    """A prompt's tokens: `<|endoftext|>` in it is the document separator, and an empty prompt is that
    separator alone, a document start."""
    return get_encoding().encode(text, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN]
