"""Samples streamed to the terminal as they are generated (the `sample` command)."""

from __future__ import annotations

import codecs
import sys

import torch

from ..errors import UserError
from ..model import GPT
from ..tokenizer import encode_prompt, get_encoding
from .device import autocast


class TokenTextStream:
    """Token ids in, text out, one token at a time.

    A GPT-2 token is a byte string that may end inside a multi-byte UTF-8 character; the incremental
    decoder holds such bytes back until the character is complete, so nothing prints as garbage.
    """

    def __init__(self):
        self._encoding = get_encoding()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._encoding.decode_single_token_bytes(token))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


def stream_samples(
    model: GPT,
    prompt: str,
    num: int = 4,
    max_new_tokens: int = 32,
    top_k: int | None = 50,
    seed: int = 42,
    device="cpu",
    autocast_dtype: torch.dtype | None = None,
    write=None,
) -> list[str]:
    """Generate `num` continuations of prompt one after another, writing each token's text as it comes.

    Returns the samples (prompt included). One generator seeded with `seed` draws all of them, so a
    seed reproduces the whole output. An empty prompt starts from <|endoftext|>, a document start.
    """
    if write is None:
        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    if num < 1 or max_new_tokens < 1:
        raise UserError(f"need at least one sample of at least one token, got num {num}, max_new_tokens {max_new_tokens}")
    device = torch.device(device)
    idx = torch.tensor([encode_prompt(prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = []
    for i in range(num):
        stream = TokenTextStream()
        pieces = [prompt]
        write(("\n" if i else "") + f"[sample {i + 1}/{num}] {prompt}")

        def on_token(next_ids: torch.Tensor) -> None:
            text = stream.push(int(next_ids[0]))
            if text:
                pieces.append(text)
                write(text)

        with autocast(device, autocast_dtype):
            model.generate(idx, max_new_tokens, top_k=top_k, generator=generator, on_token=on_token)
        pieces.append(stream.finish())
        write(pieces[-1] + "\n")
        samples.append("".join(pieces))
    return samples
