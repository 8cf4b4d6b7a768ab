"""The data directory's manifest and shards: writing them atomically, reading and checking them.

    DIR/manifest.json       tokenizer, source, settings, and per shard: split, tokens, documents, sha256
    DIR/{val,train}_NNNNNN.npy
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import io
from ..config import EOT_TOKEN, GPT2_VOCAB_SIZE
from ..errors import UserError, first_line
from ..tokenizer import BPE_SHA256, TOKENIZER_ID

FORMAT = "gpt2repro-tokens-1"
MANIFEST = "manifest.json"
SPLITS = ("val", "train")
SHARD_NAME = re.compile(r"^(val|train)_\d{6}\.npy(\.tmp)?$")
TOKENIZER = {"id": TOKENIZER_ID, "bpe_sha256": BPE_SHA256, "eot_token": EOT_TOKEN}


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
    with io.atomic_file(path, "wb") as f:
        out = _HashingFile(f)
        np.save(out, np.ascontiguousarray(tokens, dtype=np.uint16))
    return out.size, out.sha256.hexdigest()


def write_manifest(data_dir: Path, manifest: dict) -> None:
    io.write_json(Path(data_dir) / MANIFEST, manifest)


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
        raise UserError(f"{path} is not a readable data manifest ({first_line(e)})") from None
    for entry in shards:
        if not _plain_name(entry["file"]):  # a shard outside the directory could be any file on the machine
            raise UserError(f"{path} names shard file {entry['file']!r}, which is not a plain file name inside "
                            f"{data_dir}; the manifest is corrupt or was edited, prepare the data again")
    if format_ != FORMAT:
        raise UserError(f"{path} has format {format_!r}, not {FORMAT!r}")
    if not isinstance(tokenizer, dict):  # other tools record just a name
        tokenizer = {"id": tokenizer}
    if tokenizer.get("id") != TOKENIZER_ID or tokenizer.get("bpe_sha256") != BPE_SHA256:
        raise UserError(f"{path} was made with tokenizer {tokenizer.get('id')!r} (BPE sha256 "
                        f"{str(tokenizer.get('bpe_sha256'))[:12]}...), not GPT-2's; prepare the data again")
    if require_complete and not manifest.get("complete"):
        if manifest.get("refused"):  # prepare ran to the end of its sources and refused the result
            raise UserError(f"{data_dir} is incomplete: {manifest['refused']}")
        raise UserError(f"{data_dir} is incomplete (prepare was interrupted); rerun the same prepare to finish it")
    return manifest


def _plain_name(file) -> bool:
    """A file name with no directory part: not absolute, no separator, no '..'."""
    return (isinstance(file, str) and file not in ("", ".") and ".." not in file
            and "/" not in file and "\\" not in file and "\0" not in file and not Path(file).is_absolute())


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
            raise UserError(f"shard {path} is not a readable .npy file ({first_line(e)})") from None
        if tokens.dtype != np.uint16 or tokens.shape != (entry["tokens"],):
            raise UserError(f"shard {path} holds {tokens.dtype} {tokens.shape}, "
                            f"the manifest says uint16 ({entry['tokens']},)")
        if entry["max_token"] >= vocab_limit:
            raise UserError(f"shard {path} holds token id {entry['max_token']}, "
                            f"outside the vocabulary of {vocab_limit}")
        if verify and io.file_sha256(path) != entry["sha256"]:
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


def verify_in_background(data_dir, split: str | None = None) -> Future:
    """Check the sha256 of every shard of `split` (of every split with None) in a background thread.

    Returns at once. The future's `result()` is the number of bytes hashed, or raises a UserError
    naming the first shard, in file order, that is missing, has another size or another sha256 than
    the manifest records (a manifest that cannot be read raises there too). The thread is a daemon:
    a process that ends first does not wait for it. `hashlib` releases the GIL while hashing, so the
    training loop's thread is not held up; the cost is one CPU core and a sequential read.

    Cost, measured on a 2-core AMD EPYC VM (SHA extensions, shared with other jobs): 400 MB/s from a
    cold page cache, 600 MB/s from a warm one, i.e. 1.7 to 2.5 s per GB. The 10B-token data set
    (20 GB of train shards) takes 35 to 50 s, done long before a first checkpoint at step 5000.
    """
    future: Future = Future()
    future.set_running_or_notify_cancel()

    def check() -> None:
        try:
            root = Path(data_dir).expanduser()
            manifest = read_manifest(root)
            hashed = 0
            for entry in manifest["shards"]:
                if split is not None and entry["split"] != split:
                    continue
                path = root / entry["file"]
                _check_size(path, entry)
                try:
                    digest = io.file_sha256(path)
                except OSError as e:
                    raise UserError(f"shard {path} cannot be read ({first_line(e)})") from None
                if digest != entry["sha256"]:
                    raise UserError(f"shard {path} is corrupt: its sha256 differs from the manifest's "
                                    f"(checked while training); copy the data again or prepare it again")
                hashed += entry["bytes"]
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(e)
        else:
            future.set_result(hashed)

    name = f"gpt2repro-verify-{split or 'all'}"
    threading.Thread(target=check, name=name, daemon=True).start()
    return future


def describe_data_dir(data_dir) -> str:
    manifest = read_manifest(data_dir)
    parts = []
    for split in SPLITS:
        entries = [e for e in manifest["shards"] if e["split"] == split]
        documents = sum(e["documents"] for e in entries)  # the documents that start in this split
        text = f"{documents:,} document{'s' * (documents != 1)}"
        if entries and np.load(Path(data_dir) / entries[0]["file"], mmap_mode="r")[:1].tolist() != [EOT_TOKEN]:
            text += f" and the end of one begun in {SPLITS[SPLITS.index(split) - 1]}"  # the boundary cut a document
        parts.append(f"{split}: {sum(e['tokens'] for e in entries):,} tokens, {text}, "
                     f"{len(entries)} shard{'s' * (len(entries) != 1)}")
    return f"{data_dir}: " + "; ".join(parts)
