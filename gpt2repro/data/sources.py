"""Sources: local txt / jsonl(.xz/.gz) / parquet files or a streamed Hugging Face dataset, read as
documents (strings) in a fixed order."""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError, first_line
from ..io import is_hub_id, offline

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
LOCAL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


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
        elif _local_kind(path) or not is_hub_id(src):
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
        raise UserError(f"{path} is not a readable parquet file ({first_line(e, with_type=False)})") from None


def _hub_documents(dataset_id: str, name: str | None, split: str, text_field: str):
    import datasets
    from huggingface_hub import constants

    where = f"Hugging Face dataset {dataset_id}" + (f" ({name})" if name else "")
    if "/" not in dataset_id:  # it may as well have been meant as a local path
        where += " (no local file of that name exists either)"
    if offline():
        raise UserError(f"cannot stream {where}: offline mode is on ({offline()} is set)")
    _check_reachable(constants.ENDPOINT, where)
    try:
        rows = iter(datasets.load_dataset(dataset_id, name=name, split=split, streaming=True))
    except Exception as e:  # datasets raises many types (connection, missing config, auth); all end here
        raise UserError(f"cannot stream {where}: {first_line(e)}") from None
    for row_number in itertools.count(1):
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise UserError(f"{where} failed at row {row_number}: {first_line(e)}") from None
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


def _check_not_empty(source: Source, **read_options) -> None:
    if source.kind == "txt":
        empty = os.path.getsize(source.location) == 0
    else:
        documents = read_documents(source, **read_options)
        empty = next(documents, None) is None
        documents.close()
    if empty:
        raise UserError(f"source {source.location} holds no documents")
