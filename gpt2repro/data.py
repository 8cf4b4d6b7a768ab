"""Token data: `prepare` turns documents into uint16 shards, `TokenLoader` reads them back in batches.

    DIR/manifest.json       tokenizer, source, settings, and per shard: split, tokens, documents, sha256
    DIR/val_000000.npy      the first `val_tokens` tokens of the stream (more files if they exceed a shard)
    DIR/train_000000.npy    the rest, `shard_size` tokens per file (the last one shorter)

The token stream is every document's tokens, each document preceded by `<|endoftext|>` (EOT).
Shards are plain `.npy` files, readable with `numpy.load(path, mmap_mode="r")`.

Preparing is resumable and never leaves a file that looks complete but is not: every shard is
written to `NAME.npy.tmp` and renamed when whole, then the manifest, itself replaced atomically,
records it together with the position in the document stream where the next shard starts. A
re-run with the same settings skips the documents already written; `complete` turns true last.

Loading: a *window* is B*T+1 consecutive tokens of one shard's token stream; windows advance by
B*T (x = window[:-1], y = window[1:]), and tokens at a shard's end that do not fill a window are
skipped. Windows are numbered globally through an epoch, independently of the world size, and
rank r's k-th micro-batch is window k*W + r. With G accumulation steps an optimizer step takes
the G*W consecutive windows from k*W, so every world size sees the same tokens per step, and a
position saved under one world size can resume under another. Past an epoch's last window the
next epoch begins.

Order: with `shuffle=True`, epoch e reads the shards in the order `default_rng([seed, e])
.permutation(num_shards)` and the documents of shard s (split at its EOT tokens; a shard that
starts mid-document has that fragment as its first piece) in the order `default_rng([seed, e, s])
.permutation(num_pieces)`. Orders are pure functions of (seed, epoch, shard), so the loader holds
no RNG state and a position is all a checkpoint needs. With `shuffle=False` shards and documents
stay in file order: the classic loader, reading each shard in consecutive windows.

Integrity: the loader checks every shard's presence, size, `.npy` header and recorded largest
token when it is built, and every window's largest token when it is read (an id outside the
vocabulary would otherwise crash the embedding on the GPU). Hashing every shard would read the
whole data set (20 GB for 10B tokens) on every rank at every start, so the sha256 check runs on
demand: `TokenLoader(..., verify=True)` or `gpt2repro prepare --out DIR --verify`, e.g. once after
copying the data to a new machine.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import gzip
import json
import lzma
import multiprocessing
import os
import re
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import EOT_TOKEN, GPT2_VOCAB_SIZE
from .errors import UserError
from .files import file_sha256
from .tokenizer import BPE_SHA256, TOKENIZER_ID, get_encoding

FORMAT = "gpt2repro-tokens-1"
MANIFEST = "manifest.json"
SPLITS = ("val", "train")
SHARD_NAME = re.compile(r"^(val|train)_\d{6}\.npy(\.tmp)?$")
DEFAULT_SHARD_SIZE = 100_000_000  # tokens per file: 200 MB of uint16
DEFAULT_VAL_TOKENS = 10_000_000  # 0.1% of 10B tokens; 150 micro-batches of 64 x 1024
TOKENIZER = {"id": TOKENIZER_ID, "bpe_sha256": BPE_SHA256, "eot_token": EOT_TOKEN}

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
LOCAL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

GROUP_CHARS = 1 << 18  # text per tokenisation task: large enough to hide the inter-process overhead
GROUP_DOCUMENTS = 1024


# ---------------------------------------------------------------------------------------------
# sources: documents as strings, in a fixed order


@dataclass(frozen=True)
class Source:
    kind: str  # "txt", "jsonl", "parquet" or "hub"
    location: str  # absolute path, or Hugging Face dataset id


def resolve_sources(sources: list[str]) -> list[Source]:
    """Local files (directories expand to their supported files, sorted) or Hugging Face dataset ids."""
    if not sources:
        raise UserError("no source given")
    resolved = []
    for src in sources:
        path = Path(src).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _local_kind(p))
            if not files:
                raise UserError(f"source directory {path} holds no {', '.join(LOCAL_SUFFIXES)} files")
            resolved += [Source(_local_kind(p), str(p.resolve())) for p in files]
        elif path.is_file():
            if not _local_kind(path):
                raise UserError(f"source {path} is not a {', '.join(LOCAL_SUFFIXES)} file")
            resolved.append(Source(_local_kind(path), str(path.resolve())))
        elif _local_kind(path) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", src) or src.startswith("."):
            raise UserError(f"source {path} does not exist")
        else:
            resolved.append(Source("hub", src))
    return resolved


def _local_kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("txt", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def read_documents(source: Source, text_field: str = "text", name: str | None = None, split: str = "train"):
    """The documents of one source, in order, as strings."""
    if source.kind == "txt":
        return _text_file_documents(Path(source.location))
    if source.kind == "jsonl":
        return _jsonl_documents(Path(source.location), text_field)
    if source.kind == "parquet":
        return _parquet_documents(Path(source.location), text_field)
    return _hub_documents(source.location, name, split, text_field)


def _text_file_documents(path: Path):
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_documents(path: Path, text_field: str):
    suffix = path.suffix.lower()
    opener = lzma.open if suffix == ".xz" else gzip.open if suffix == ".gz" else open
    line_number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
                yield _text_of(record, text_field, f"{path}:{line_number}")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 after line {line_number} ({e.reason})") from None
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path} is corrupt or truncated after line {line_number} ({e})") from None


def _parquet_documents(path: Path, text_field: str):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)})")
        row = 0
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    raise UserError(f"{path}: row {row} has a {type(value).__name__} in {text_field!r}, not text")
                yield value
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None


def _hub_documents(dataset_id: str, name: str | None, split: str, text_field: str):
    import datasets
    from huggingface_hub import constants

    where = f"Hugging Face dataset {dataset_id}" + (f" ({name})" if name else "")
    if "/" not in dataset_id:  # it may as well have been meant as a local path
        where += " (no local file of that name exists either)"
    if datasets.config.HF_DATASETS_OFFLINE or constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot stream {where}: offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)")
    _check_reachable(constants.ENDPOINT, where)
    try:
        rows = iter(datasets.load_dataset(dataset_id, name=name, split=split, streaming=True))
    except Exception as e:  # datasets raises many types (connection, missing config, auth); all end here
        raise UserError(f"cannot stream {where}: {_first_line(e)}") from None
    for row_number in itertools.count(1):
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise UserError(f"{where} failed at row {row_number}: {_first_line(e)}") from None
        yield _text_of(row, text_field, f"{where}, row {row_number}")


def _check_reachable(endpoint: str, where: str) -> None:
    """Fail in seconds, not after the Hub client's minute of retries, when there is no network."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # only the proxy can tell; a direct connection may be blocked by design
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
    except OSError as e:
        raise UserError(f"cannot stream {where}: {url.hostname} is unreachable ({e.strerror or e})") from None


def _text_of(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise UserError(f"{where}: no {text_field!r} field (fields: {', '.join(map(str, record)) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: {text_field!r} is a {type(text).__name__}, not text")
    return text


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _check_not_empty(source: Source, **read_options) -> None:
    if source.kind == "txt":
        empty = os.path.getsize(source.location) == 0
    else:
        documents = read_documents(source, **read_options)
        empty = next(documents, None) is None
        documents.close()
    if empty:
        raise UserError(f"source {source.location} holds no documents")


# ---------------------------------------------------------------------------------------------
# tokenisation: groups of documents, tokenised in a process pool, results in input order


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


# ---------------------------------------------------------------------------------------------
# writing: atomic shards and manifest


class _HashingFile:
    """Hashes and counts what numpy writes on its way to the file."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)


def save_shard(path: Path, tokens: np.ndarray) -> tuple[int, str]:
    """Write `tokens` as a uint16 .npy file atomically; returns its size in bytes and sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        out = _HashingFile(f)
        np.save(out, np.ascontiguousarray(tokens, dtype=np.uint16))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return out.size, out.sha256.hexdigest()


def write_manifest(data_dir: Path, manifest: dict) -> None:
    path = Path(data_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_entry(file: str, split: str, tokens: np.ndarray, nbytes: int, sha256: str) -> dict:
    return {
        "file": file,
        "split": split,
        "tokens": int(tokens.size),
        "documents": int(np.count_nonzero(tokens == EOT_TOKEN)),  # documents starting in this shard
        "max_token": int(tokens.max()) if tokens.size else 0,
        "bytes": nbytes,
        "sha256": sha256,
    }


# ---------------------------------------------------------------------------------------------
# prepare


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
    tokens of the stream form the val split (all of them if the sources hold fewer). Output does
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
    manifest["complete"] = True
    manifest["documents"] = first_document
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


# ---------------------------------------------------------------------------------------------
# reading and checking a data directory


def read_manifest(data_dir, require_complete: bool = True) -> dict:
    """The manifest of a data directory, checked for format, tokenizer and completeness."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist")
    path = data_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{data_dir} has no {MANIFEST}; create it with gpt2repro prepare --source SRC --out {data_dir}")
    try:
        manifest = json.loads(path.read_text())
        format_, tokenizer, shards = manifest["format"], manifest["tokenizer"], manifest["shards"]
        for entry in shards:
            for key in ("file", "split", "tokens", "documents", "max_token", "bytes", "sha256"):
                entry[key]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable data manifest ({_first_line(e)})") from None
    if format_ != FORMAT:
        raise UserError(f"{path} has format {format_!r}, not {FORMAT!r}")
    if not isinstance(tokenizer, dict):  # other tools record just a name
        tokenizer = {"id": tokenizer}
    if tokenizer.get("id") != TOKENIZER_ID or tokenizer.get("bpe_sha256") != BPE_SHA256:
        raise UserError(f"{path} was made with tokenizer {tokenizer.get('id')!r} (BPE sha256 "
                        f"{str(tokenizer.get('bpe_sha256'))[:12]}...), not GPT-2's; prepare the data again")
    if require_complete and not manifest.get("complete"):
        raise UserError(f"{data_dir} is incomplete (prepare was interrupted); rerun the same prepare to finish it")
    return manifest


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int
    sha256: str


def _check_size(path: Path, entry: dict) -> None:
    if not path.is_file():
        raise UserError(f"shard {path} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise UserError(f"shard {path} is truncated or damaged: {size:,} bytes, the manifest says {entry['bytes']:,}")


def open_split(data_dir, split: str, vocab_limit: int = GPT2_VOCAB_SIZE, verify: bool = False) -> list[Shard]:
    """The checked shards of one split, in file order (sha256 only with `verify`)."""
    data_dir = Path(data_dir).expanduser()
    manifest = read_manifest(data_dir)
    entries = [e for e in manifest["shards"] if e["split"] == split]
    if not entries:
        held = ", ".join(f"{s} ({sum(e['split'] == s for e in manifest['shards'])} shards)" for s in SPLITS)
        raise UserError(f"{data_dir} has no {split} shards; it holds {held}")
    shards = []
    for entry in entries:
        path = data_dir / entry["file"]
        _check_size(path, entry)
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise UserError(f"shard {path} is not a readable .npy file ({_first_line(e)})") from None
        if tokens.dtype != np.uint16 or tokens.shape != (entry["tokens"],):
            raise UserError(f"shard {path} holds {tokens.dtype} {tokens.shape}, "
                            f"the manifest says uint16 ({entry['tokens']},)")
        if entry["max_token"] >= vocab_limit:
            raise UserError(f"shard {path} holds token id {entry['max_token']}, "
                            f"outside the vocabulary of {vocab_limit}")
        if verify and file_sha256(path) != entry["sha256"]:
            raise UserError(f"shard {path} is corrupt: its sha256 differs from the manifest's")
        shards.append(Shard(path, entry["tokens"], entry["sha256"]))
    return shards


def verify_data_dir(data_dir) -> dict:
    """Check every shard of every split, sha256 included; returns the manifest."""
    manifest = read_manifest(data_dir)
    for split in SPLITS:
        if any(e["split"] == split for e in manifest["shards"]):
            open_split(data_dir, split, verify=True)
    return manifest


def describe_data_dir(data_dir) -> str:
    manifest = read_manifest(data_dir)
    parts = []
    for split in SPLITS:
        entries = [e for e in manifest["shards"] if e["split"] == split]
        parts.append(f"{split}: {sum(e['tokens'] for e in entries):,} tokens, "
                     f"{sum(e['documents'] for e in entries):,} documents, {len(entries)} shard{'s' * (len(entries) != 1)}")
    return f"{data_dir}: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# loading


class TokenLoader:
    """Batches of B x T tokens from one split; see the module docstring for order and sharding."""

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 1337, shuffle: bool = True, vocab_size: int | None = None,
                 pin_memory: bool | None = None, verify: bool = False):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world_size {world_size})")
        if seed < 0:
            raise UserError(f"the data seed must not be negative, got {seed}")
        self.data_dir, self.split = Path(data_dir).expanduser(), split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.vocab_limit = min(vocab_size or GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shards = open_split(self.data_dir, split, self.vocab_limit, verify)
        self.tokens_per_window = batch_size * seq_len
        self.windows_per_shard = np.array([max(s.tokens - 1, 0) // self.tokens_per_window for s in self.shards])
        self.windows_per_epoch = int(self.windows_per_shard.sum())
        if self.windows_per_epoch == 0:
            largest = max(s.tokens for s in self.shards)
            hint = "prepare with a larger --val-tokens" if split == "val" else "use more data"
            raise UserError(f"the {split} split of {self.data_dir} ({largest:,} tokens in its largest shard) is too "
                            f"small for one {batch_size} x {seq_len} batch ({self.tokens_per_window + 1:,} tokens); "
                            f"lower the batch size or {hint}")
        self.data_sha256 = hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()[:16]
        self._memmaps: dict[int, np.ndarray] = {}
        self._epoch_order: tuple[int, np.ndarray, np.ndarray] | None = None
        self._layouts: collections.OrderedDict = collections.OrderedDict()
        self._start = 0  # global window index of rank 0's first batch since construction or load_state_dict
        self._batches_taken = 0  # batches this rank has returned since then

    # -- position ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Windows taken by all ranks together (each rank having taken the same number)."""
        return self._start + self._batches_taken * self.world_size

    def state_dict(self) -> dict:
        epoch, window = divmod(self.position, self.windows_per_epoch)
        shard, local = self._locate(epoch, window)
        return {
            "split": self.split,
            "epoch": epoch,
            "window": window,  # next window of the epoch; rank r continues with window + r
            "shard": self.shards[shard].path.name,  # where that window lies, for people reading the file
            "token_offset": local * self.tokens_per_window,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "tokens_per_window": self.tokens_per_window,
            "data_sha256": self.data_sha256,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, window = int(state["epoch"]), int(state["window"])
            saved = {key: state[key] for key in ("split", "seed", "shuffle", "tokens_per_window", "data_sha256")}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"data loader state is malformed ({_first_line(e)})") from None
        current = {"split": self.split, "seed": self.seed, "shuffle": self.shuffle,
                   "tokens_per_window": self.tokens_per_window, "data_sha256": self.data_sha256}
        changed = [f"{key} {saved[key]!r} -> {current[key]!r}" for key in current if saved[key] != current[key]]
        if changed:
            raise UserError(f"data loader state does not fit this loader of {self.data_dir}: {'; '.join(changed)}")
        if epoch < 0 or not 0 <= window < self.windows_per_epoch:
            raise UserError(f"data loader state points at epoch {epoch}, window {window}, outside this data")
        self._start = epoch * self.windows_per_epoch + window
        self._batches_taken = 0

    # -- batches ----------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64, y = x shifted by one token; pinned when `pin_memory`."""
        window = self.window(self.position + self.rank)
        self._batches_taken += 1
        batch = torch.empty((2, self.batch_size, self.seq_len), dtype=torch.int64, pin_memory=self.pin_memory)
        xy = batch.numpy()
        np.copyto(xy[0], window[:-1].reshape(self.batch_size, self.seq_len))
        np.copyto(xy[1], window[1:].reshape(self.batch_size, self.seq_len))
        return batch[0], batch[1]

    def window(self, index: int) -> np.ndarray:
        """Global window `index` (counting through all epochs): B*T+1 uint16 tokens."""
        epoch, in_epoch = divmod(index, self.windows_per_epoch)
        shard, local = self._locate(epoch, in_epoch)
        begin = local * self.tokens_per_window
        if self.shuffle:
            window = self._gather(shard, self._layout(epoch, shard), begin)
        else:
            window = self._memmap(shard)[begin : begin + self.tokens_per_window + 1]
        top = int(window.max())
        if top >= self.vocab_limit:
            raise UserError(f"shard {self.shards[shard].path} holds token id {top}, outside the vocabulary of "
                            f"{self.vocab_limit}; it is corrupt (check with gpt2repro prepare --verify)")
        return window

    def _locate(self, epoch: int, in_epoch: int) -> tuple[int, int]:
        """(shard index, window index inside the shard) of an epoch's window."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)) if self.shuffle
                     else np.arange(len(self.shards)))
            self._epoch_order = (epoch, order, np.cumsum(self.windows_per_shard[order]))
        _, order, ends = self._epoch_order
        slot = int(np.searchsorted(ends, in_epoch, side="right"))
        return int(order[slot]), in_epoch - (int(ends[slot - 1]) if slot else 0)

    def _memmap(self, shard: int) -> np.ndarray:
        if shard not in self._memmaps:
            self._memmaps[shard] = np.load(self.shards[shard].path, mmap_mode="r")
        return self._memmaps[shard]

    def _layout(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's documents in this epoch's order: their starts in the file, their offsets in the stream."""
        key = (epoch, shard)
        if key not in self._layouts:
            tokens = self._memmap(shard)
            chunk = 1 << 24  # scan in 32 MB pieces: the shard is never in RAM as a whole
            eot = np.concatenate([np.flatnonzero(tokens[i : i + chunk] == EOT_TOKEN) + i
                                  for i in range(0, tokens.size, chunk)])
            starts = np.union1d([0], eot)  # a leading fragment of a document continued from the previous shard
            lengths = np.diff(np.append(starts, tokens.size))
            order = np.random.default_rng([self.seed, epoch, shard]).permutation(starts.size)
            self._layouts[key] = (starts[order], np.concatenate([[0], np.cumsum(lengths[order])]))
            if len(self._layouts) > 2:  # ranks move forward: the previous shard at most is still needed
                self._layouts.popitem(last=False)
        return self._layouts[key]

    def _gather(self, shard: int, layout: tuple[np.ndarray, np.ndarray], begin: int) -> np.ndarray:
        starts, offsets = layout
        tokens = self._memmap(shard)
        size = self.tokens_per_window + 1
        window = np.empty(size, dtype=np.uint16)
        piece = int(np.searchsorted(offsets, begin, side="right")) - 1
        filled = 0
        while filled < size:
            skip = begin + filled - int(offsets[piece])
            take = min(int(offsets[piece + 1] - offsets[piece]) - skip, size - filled)
            source = int(starts[piece]) + skip
            window[filled : filled + take] = tokens[source : source + take]
            filled += take
            piece += 1
        return window


def validation_batches(data_dir, batch_size: int, seq_len: int, num_batches: int, rank: int = 0,
                       world_size: int = 1, vocab_size: int | None = None, pin_memory: bool | None = None,
                       verify: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `num_batches` windows of the val split in file order; rank r gets windows r, r+W, ...

    The same windows on every call, so validation losses are comparable across a run and across runs.
    """
    loader = TokenLoader(data_dir, "val", batch_size, seq_len, rank=rank, world_size=world_size, shuffle=False,
                         vocab_size=vocab_size, pin_memory=pin_memory, verify=verify)
    if num_batches > loader.windows_per_epoch:
        raise UserError(f"the val split of {loader.data_dir} holds {loader.windows_per_epoch} batches of "
                        f"{batch_size} x {seq_len}, fewer than the {num_batches} asked for")
    return [loader.next_batch() for _ in range(rank, num_batches, world_size)]
