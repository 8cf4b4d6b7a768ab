"""HellaSwag's data: the official jsonl files downloaded once into a cache, and parsed.

`load_hellaswag("auto")` downloads the official jsonl files once into the cache directory
`$GPT2REPRO_CACHE/hellaswag` (default `$XDG_CACHE_HOME/gpt2repro/hellaswag`, i.e.
`~/.cache/gpt2repro/hellaswag`) and records each file's sha256 beside it. With HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE set, nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from .. import io
from ..errors import UserError

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{name}.jsonl"
HELLASWAG_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}  # split -> file name part


@dataclass(frozen=True)
class HellaSwagExample:
    ctx: str  # the context the endings continue
    endings: tuple[str, str, str, str]
    label: int | None  # index of the true ending; None in the unlabelled test split
    index: int  # position in the source file (0-based), to match predictions back


def hellaswag_cache_dir(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("GPT2REPRO_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2repro"
    return Path(root).expanduser() / "hellaswag"


def _fetch(url: str, dest: Path, label: str) -> str:
    """Stream url into dest (atomically) with a progress bar; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=30) as response, io.atomic_file(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {label}") as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def download_hellaswag(split: str = "validation", cache_dir=None) -> Path:
    """The cached jsonl of a HellaSwag split, downloaded on first use; its sha256 is kept in NAME.sha256.

    A later use checks the file against that sha256, so a damaged cache is reported, not scored.
    A file put into the cache by hand is accepted and its sha256 recorded then.
    """
    if split not in HELLASWAG_SPLITS:
        raise UserError(f"unknown HellaSwag split {split!r}; known: train, validation, test")
    name = f"hellaswag_{HELLASWAG_SPLITS[split]}.jsonl"
    path = hellaswag_cache_dir(cache_dir) / name
    sidecar = path.with_name(name + ".sha256")
    url = HELLASWAG_URL.format(name=HELLASWAG_SPLITS[split])
    if path.is_file():
        digest = io.file_sha256(path)
        if sidecar.is_file():
            recorded = (sidecar.read_text().split() or [""])[0]
            if recorded != digest:
                raise UserError(f"cached {path} does not match its recorded sha256; delete it to download it again")
        else:
            io.write_text(sidecar, f"{digest}  {name}\n")
        return path
    offline = io.offline()
    if offline:
        raise UserError(f"HellaSwag {split} is not cached and {offline} is set: put {url} at {path}, or pass a local jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        digest = _fetch(url, path, name)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download HellaSwag {split} from {url} ({reason}): put the file at {path}, or pass a local jsonl") from None
    io.write_text(sidecar, f"{digest}  {name}\n")
    return path


def _parse_example(line: str, where: str, index: int) -> HellaSwagExample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
    if not isinstance(ctx, str):
        raise UserError(f"{where}: 'ctx' must be a string")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        got = f"a list of {len(endings)}" if isinstance(endings, list) else type(endings).__name__
        raise UserError(f"{where}: 'endings' must be a list of 4 strings, got {got}")
    if isinstance(label, str) and label.strip().isdigit():  # the Hub copy stores labels as strings
        label = int(label)
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4):
        raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3, got {label!r}")
    return HellaSwagExample(ctx=ctx, endings=tuple(endings), label=label, index=index)


def read_hellaswag(path) -> list[HellaSwagExample]:
    """Examples of a HellaSwag jsonl file: one object per line with ctx, endings (4) and label."""
    path = Path(path).expanduser()
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    examples.append(_parse_example(line, f"{path}:{line_number}", len(examples)))
    except FileNotFoundError:
        raise UserError(f"HellaSwag file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"HellaSwag file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read HellaSwag file {path} ({e.strerror})") from None
    if not examples:
        raise UserError(f"HellaSwag file {path} holds no examples")
    return examples


def load_hellaswag(source: str, split: str = "validation", cache_dir=None) -> list[HellaSwagExample]:
    """HellaSwag examples from "auto" (the official `split`, downloaded once) or a local jsonl path."""
    path = download_hellaswag(split, cache_dir) if source == "auto" else source
    return read_hellaswag(path)


def hellaswag_metric_path() -> Path:
    """Directory of the HellaSwag `evaluate` module shipped with the package: `evaluate.load(str(path))`."""
    return Path(str(resources.files("gpt2repro") / "metrics" / "hellaswag"))
