"""Durable writes and tolerant reads: every file and directory the package writes goes through here.

A file is written to a temporary sibling, flushed and fsync'ed, renamed over the target, and its
directory fsync'ed, so a crash leaves either the old file or the new one, never a torn one. A
directory (a checkpoint, an export) is filled under a temporary name and renamed whole the same way.
A full disk during either cleans up the partial write and says how much room was needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import UserError


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(target: Path, error: OSError, needed: int | None = None) -> UserError:
    free = shutil.disk_usage(target.parent if target.parent.exists() else Path.cwd()).free
    room = f"; it needs about {needed:,} bytes" if needed else ""
    return UserError(f"no space left on the device while writing {target} ({free:,} bytes free{room}); "
                     "free some space and run the same command again")


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb", **open_kwargs):
    """`with atomic_file(p, "w") as f: f.write(...)`: the file appears at `p` whole, or not at all."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            raise _disk_full(path, e) from None
        raise
    fsync_dir(path.parent)


def write_text(path, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory, deepest first."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_dir(path, needed_bytes: int | None = None):
    """`with atomic_dir(p) as tmp: write files into tmp`: then `p` is replaced by tmp whole.

    The temporary directory is `p.tmp` (a leftover from an interrupted write is removed first). On
    any failure it is removed and `p` stays as it was; a full disk becomes a one-line UserError that
    names `needed_bytes`, the room the write needed, when given.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            raise _disk_full(path, e, needed_bytes) from None
        raise
    fsync_dir(path.parent)


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC, or a library's error that carries it only in its message (safetensors raises its own type)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG):
        return True
    cause = error.__cause__ or error.__context__
    return "No space left on device" in str(error) or (cause is not None and _is_disk_full(cause))


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 4 MiB pieces so that a 200 MB shard never sits in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_jsonl(path) -> list[dict]:
    """The objects of a JSON-lines file in order. A last line cut short (a crash mid-write, no
    newline after it) is skipped; a malformed line anywhere else is a UserError naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the writer was interrupted
                break
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records


def append_jsonl(path, record: dict) -> None:
    """Add one line; a torn tail from an earlier crash is cut off first, so the new line stands alone."""
    path = Path(path)
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # a torn last line: drop it
                f.seek(0)
                content = f.read()
                f.truncate(content.rfind(b"\n") + 1)
        f.seek(0, os.SEEK_END)
        f.write((json.dumps(record) + "\n").encode())


def offline() -> str | None:
    """The name of the set variable (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) that forbids downloads, or None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def is_hub_id(text: str, owner_required: bool = False) -> bool:
    """Whether `text` reads as a Hugging Face Hub repository id: NAME or OWNER/NAME (OWNER/NAME only
    with `owner_required`), of letters, digits, '-', '_' and '.', not starting with '.'."""
    parts = text.split("/")
    if len(parts) not in ((2,) if owner_required else (1, 2)):
        return False
    return all(part and not part.startswith(".") and all(c.isalnum() or c in "-_." for c in part) for part in parts)
