"""`prepare`: documents -> GPT-2 tokens, each document preceded by EOT -> uint16 shards + manifest.

Resumable: every shard is written whole and then recorded in the manifest with the position in
the document stream where the next shard starts, so a rerun with the same settings continues there.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import EOT_TOKEN
from ..errors import UserError
from ..tokenizer import get_encoding
from .manifest import FORMAT, MANIFEST, SHARD_NAME, SPLITS, TOKENIZER, read_manifest, save_shard, shard_entry, write_manifest, _check_size
from .sources import _check_not_empty, read_documents, resolve_sources

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per file: 200 MB of uint16
DEFAULT_VAL_TOKENS = 10_000_000  # 0.1% of 10B tokens; 150 micro-batches of 64 x 1024
GROUP_CHARS = 1 << 18  # text per tokenisation task: large enough to hide the inter-process overhead
GROUP_DOCUMENTS = 1024


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The documents' tokens, each preceded by EOT, concatenated; and each document's token count."""
    encode = get_encoding().encode_ordinary  # ordinary: "<|endoftext|>" in a text is text, not EOT
    encoded = [encode(text) for text in texts]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    start = 0
    for ids, length in zip(encoded, lengths.tolist()):
        tokens[start] = EOT_TOKEN
        tokens[start + 1 : start + length] = ids
        start += length
    return tokens, lengths


def _groups(documents, max_chars: int = GROUP_CHARS, max_documents: int = GROUP_DOCUMENTS):
    group, chars = [], 0
    for text in documents:
        group.append(text)
        chars += len(text)
        if chars >= max_chars or len(group) >= max_documents:
            yield group
            group, chars = [], 0
    if group:
        yield group


def _tokenize(groups, num_workers: int):
    """`encode_documents` over `groups`, in order, with at most a few groups in flight.

    Submitting with a bounded queue of `apply_async` results (rather than `Pool.imap`) keeps the
    source being read in this thread, so a reader's error surfaces here with its line number, and
    holds only a few groups in memory however far ahead the source could be read.
    """
    if num_workers == 1:
        yield from map(encode_documents, groups)
        return
    # fork shares the already loaded tokenizer with the workers; elsewhere they load their own
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(start_method).Pool(num_workers) as pool:
        in_flight = collections.deque()
        for group in groups:
            in_flight.append(pool.apply_async(encode_documents, (group,)))
            if len(in_flight) > 2 * num_workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def prepare(
    sources: list[str],
    out_dir,
    *,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_tokens: int = DEFAULT_VAL_TOKENS,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Tokenise `sources` into `out_dir`; resume an interrupted run with the same settings.

    `sources` are local files (`.txt`: one document per file; `.jsonl`, `.jsonl.xz`, `.jsonl.gz`,
    `.parquet`: one document per record, text in `text_field`), directories of them, or Hugging
    Face dataset ids, streamed with configuration `name` and split `split`. The first `val_tokens`
    tokens of the stream form the val split; sources that hold no more than that leave no train
    split and are refused once read to their end, the directory left marked incomplete. Output does
    not depend on `num_workers` (default: the CPU count). `progress=None` shows a bar on a terminal.
    """
    if shard_size < 1 or val_tokens < 0:
        raise UserError(f"need shard_size >= 1 and val_tokens >= 0, got {shard_size} and {val_tokens}")
    num_workers = num_workers or default_workers()
    if num_workers < 1:
        raise UserError(f"workers must be at least 1, got {num_workers}")
    resolved = resolve_sources(list(sources))
    out_dir = Path(out_dir).expanduser()
    settings = {
        "sources": [s.location for s in resolved],
        "name": name,
        "split": split,
        "text_field": text_field,
        "shard_size": shard_size,
        "val_tokens": val_tokens,
    }
    manifest, stale_files = _start_or_resume(out_dir, settings, overwrite)
    if manifest["complete"]:
        return out_dir
    read_options = {"text_field": text_field, "name": name, "split": split}
    for source in resolved:  # before anything is written or removed: an unreadable or empty source fails now
        _check_not_empty(source, **read_options)
    for path in stale_files:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, manifest)

    resume = manifest["resume"]
    documents = itertools.chain.from_iterable(read_documents(s, **read_options) for s in resolved)
    documents = itertools.islice(documents, resume["document"], None)
    written = {s: sum(e["tokens"] for e in manifest["shards"] if e["split"] == s) for s in SPLITS}
    buffer = np.empty(shard_size, dtype=np.uint16)
    filled = 0

    def current_shard() -> tuple[str, int]:
        if written["val"] < val_tokens:
            return "val", min(shard_size, val_tokens - written["val"])
        return "train", shard_size

    def flush(next_document: int, next_token: int) -> None:
        nonlocal filled
        shard_split = current_shard()[0]
        index = sum(e["split"] == shard_split for e in manifest["shards"])
        file = f"{shard_split}_{index:06d}.npy"
        tokens = buffer[:filled]
        nbytes, sha256 = save_shard(out_dir / file, tokens)
        manifest["shards"].append(shard_entry(file, shard_split, tokens, nbytes, sha256))
        manifest["resume"] = {"document": next_document, "token": next_token}
        write_manifest(out_dir, manifest)
        written[shard_split] += filled
        filled = 0

    first_document, skip = resume["document"], resume["token"]
    bar = tqdm(total=None, initial=sum(written.values()), unit="tok", unit_scale=True, desc=f"prepare {out_dir.name}",
               disable=None if progress is None else not progress, dynamic_ncols=True)
    started, documents_done = time.perf_counter(), 0
    with bar:
        for tokens, lengths in _tokenize(_groups(documents), num_workers):
            position = skip  # the resumed document's first tokens are already in a shard
            while position < tokens.size:
                capacity = current_shard()[1]
                take = min(capacity - filled, tokens.size - position)
                buffer[filled : filled + take] = tokens[position : position + take]
                filled += take
                position += take
                if filled == capacity:
                    ends = np.cumsum(lengths)
                    inside = int(np.searchsorted(ends, position, side="right"))
                    flush(first_document + inside, position - (int(ends[inside - 1]) if inside else 0))
            bar.update(tokens.size - skip)
            first_document += lengths.size
            documents_done += lengths.size
            skip = 0
            bar.set_postfix_str(f"{documents_done / (time.perf_counter() - started):,.0f} docs/s", refresh=False)
        if filled:
            flush(first_document, 0)
    manifest["documents"] = first_document
    if not written["train"]:
        # only known at the end: a streamed source's length is not known before it has been read
        manifest["refused"] = (f"its sources hold {written['val']:,} tokens, not more than --val-tokens "
                               f"{val_tokens:,}, so the train split is empty; prepare again with a smaller "
                               "--val-tokens and --overwrite, or add sources")
        write_manifest(out_dir, manifest)  # still complete: false, so no loader reads it
        raise UserError(f"{out_dir} is incomplete: {manifest['refused']}")
    manifest.pop("refused", None)
    manifest["complete"] = True
    write_manifest(out_dir, manifest)
    return out_dir


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_or_resume(out_dir: Path, settings: dict, overwrite: bool) -> tuple[dict, list[Path]]:
    """The manifest to continue from (a new one, or the existing one if its settings match) and the
    files of ours to remove first: all with `overwrite`, else temp files and shards the manifest lacks."""
    fresh = {"format": FORMAT, "tokenizer": TOKENIZER, "source": settings, "complete": False,
             "resume": {"document": 0, "token": 0}, "shards": []}
    if not out_dir.exists():
        return fresh, []
    if not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    ours = sorted(p for p in out_dir.iterdir() if SHARD_NAME.match(p.name) or p.name in (MANIFEST, MANIFEST + ".tmp"))
    if overwrite:
        return fresh, ours
    if not (out_dir / MANIFEST).exists():
        if ours:
            raise UserError(f"{out_dir} holds shards but no {MANIFEST}; pass --overwrite or choose another --out")
        return fresh, []
    manifest = read_manifest(out_dir, require_complete=False)
    if manifest["source"] != settings:
        changed = ", ".join(k for k in settings if manifest["source"].get(k) != settings[k])
        raise UserError(f"{out_dir} was prepared with other settings ({changed} differ); "
                        "pass --overwrite to replace it or choose another --out")
    if manifest["complete"]:
        return manifest, []
    for entry in manifest["shards"]:
        _check_size(out_dir / entry["file"], entry)
    listed = {e["file"] for e in manifest["shards"]} | {MANIFEST}
    # a shard renamed after the manifest's last write, or a temp file, is redone
    return manifest, [p for p in ours if p.name not in listed]
