"""Training checkpoints: dicts of state dicts <-> safetensors and JSON, written atomically, checked on load.

    RUN/checkpoints/step_000500/     the state after 500 optimizer steps (steps 0..499 done)
        config.json            {"format": "gpt2repro", "model": {GPTConfig fields}}
        model.safetensors      the model's weights (the tied lm_head.weight stored once, as wte)
        optimizer.safetensors  AdamW moment tensors, named state.<param index>.<key>
        optimizer.json         param groups and non-tensor optimizer state
        trainer_state.json     step, tokens seen, data-loader state, train config, RNG state of every rank
        manifest.json          size and sha256 of every file above

A checkpoint is the dict `{"model_config": {...}, "model": {name: tensor}, "optimizer": the optimizer's
state_dict (integer parameter indices), "trainer": {JSON}}`; the Trainer builds it (gathering sharded
state first) and restores from it. This module knows files, not models.

Nothing here needs pickle to load, so a downloaded checkpoint cannot run code. A checkpoint is written
into `step_NNNNNN.tmp`, fsync'ed and renamed when complete; the manifest lets a reader reject a
directory damaged afterwards and fall back to the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import io
from .config import GPTConfig
from .errors import UserError
from .model import GPT
from .run_dir import RunDir

logger = logging.getLogger(__name__)

FORMAT = "gpt2repro"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
TRAINING_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json")


# ---------------------------------------------------------------------------------------------
# the model alone: config.json + model.safetensors


def write_model(path, model_config: GPTConfig, weights: dict[str, torch.Tensor]) -> None:
    """config.json and model.safetensors into the directory `path` (which must exist)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items() if k != "lm_head.weight"}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    io.write_json(path / "config.json", {"format": FORMAT, "model": dataclasses.asdict(model_config)})


def save_model_dir(path, model_config: GPTConfig, weights: dict[str, torch.Tensor]) -> Path:
    """A model-only directory (config.json + model.safetensors + manifest.json), written atomically."""
    path = Path(path).expanduser()
    with io.atomic_dir(path) as tmp:
        write_model(tmp, model_config, weights)
        _write_manifest(tmp, step=None)
    return path


def is_checkpoint_dir(path) -> bool:
    """Whether `path` holds our config.json (a checkpoint or a model-only directory)."""
    config = Path(str(path)).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_model_config(path) -> GPTConfig:
    path = Path(path)
    try:
        return GPTConfig(**json.loads((path / "config.json").read_text())["model"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {path} has an unreadable config.json ({e})") from None


def load_model(path, verify: bool = True) -> GPT:
    """A GPT from a checkpoint or model-only directory, after checking its files against the manifest."""
    path = Path(path).expanduser()
    if verify:
        verify_checkpoint(path, training=False)
    model = GPT(read_model_config(path))
    model.load_weights(_load_tensors(path / "model.safetensors"), source=f"checkpoint {path}")
    return model


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


# ---------------------------------------------------------------------------------------------
# optimizer state without pickle


def _optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# full training checkpoints


def checkpoint_path(root, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def _write_manifest(path: Path, step: int | None) -> None:
    files = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    entries = {name: {"bytes": (path / name).stat().st_size, "sha256": io.file_sha256(path / name)} for name in files}
    io.write_json(path / "manifest.json", {"format": FORMAT, "step": step, "files": entries})


def state_bytes(state: dict) -> int:
    """About what a checkpoint of `state` takes on disk: its tensors' bytes."""
    tensors = list(state["model"].values())
    for param_state in state["optimizer"]["state"].values():
        tensors += [v for v in param_state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def save_checkpoint(root, step: int, state: dict, keep: int = 3, pinned: tuple[int, ...] = ()) -> Path:
    """Write step_NNNNNN atomically, then delete valid checkpoints older than the newest `keep`
    (pinned ones and the one just written stay; damaged ones are never deleted).

    `state` is {"model_config": GPTConfig, "model": weights, "optimizer": optimizer state_dict,
    "trainer": JSON-serialisable dict}, all of it full (unsharded) tensors. Call on one process.
    """
    final = checkpoint_path(root, step)
    with io.atomic_dir(final, needed_bytes=state_bytes(state)) as tmp:
        write_model(tmp, state["model_config"], state["model"])
        tensors, meta = _optimizer_to_files(state["optimizer"])
        save_file(tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
        io.write_json(tmp / "optimizer.json", meta)
        io.write_json(tmp / "trainer_state.json", state["trainer"])
        _write_manifest(tmp, step)
    prune(root, keep, set(pinned), written=step)
    return final


def load_checkpoint(path, model_config: GPTConfig | None = None) -> dict:
    """The state dict a checkpoint holds (the inverse of save_checkpoint), after a full check; with
    `model_config`, a checkpoint of another model shape is refused."""
    path = Path(path)
    verify_checkpoint(path)
    saved = read_model_config(path)
    if model_config is not None and saved != model_config:
        raise UserError(f"checkpoint {path} was written for {saved}, not for this run's {model_config}")
    try:
        meta = json.loads((path / "optimizer.json").read_text())
        trainer = json.loads((path / "trainer_state.json").read_text())
        optimizer = _optimizer_from_files(_load_tensors(path / "optimizer.safetensors"), meta)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path} holds unreadable training state ({e})") from None
    return {"model_config": saved, "model": _load_tensors(path / "model.safetensors"),
            "optimizer": optimizer, "trainer": trainer}


def prune(root, keep: int, pinned: set[int], written: int) -> None:
    """Delete intact checkpoints beyond the newest `keep`, except pinned ones and the one just
    `written` (not checked again). Every other checkpoint is checked in full first: a damaged one is
    never deleted and never takes an intact one's place. A checkpoint is renamed out of the
    step_NNNNNN pattern before it is deleted, so a deletion cut short leaves nothing that looks like one."""
    root = Path(root)
    for leftover in root.glob("step_*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)
    intact = scan_checkpoints(root, full=True, trusted={written})[0]
    steps = sorted(intact)
    for step in steps[:-keep] if keep > 0 else steps:
        if step not in pinned and step != written:
            doomed = intact[step].with_name(intact[step].name + ".deleting")
            intact[step].rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def scan_checkpoints(root, full: bool = True, trusted: set[int] = frozenset()) -> tuple[dict[int, Path], dict[Path, str]]:
    """The checkpoints under root: ({step: path} of the intact ones, {path: reason} of the damaged ones).

    Temporary directories of interrupted writes are neither. `full=False` checks sizes, not sha256s;
    the `trusted` steps are checked by size only.
    """
    root = Path(root)
    intact, damaged = {}, {}
    if root.is_dir():
        for path in sorted(root.iterdir()):
            match = STEP_DIR.match(path.name)
            if match and path.is_dir():
                try:
                    verify_checkpoint(path, full=full and int(match.group(1)) not in trusted)
                except UserError as e:
                    damaged[path] = str(e)
                    continue
                intact[int(match.group(1))] = path
    return intact, damaged


def list_checkpoints(root) -> dict[int, Path]:
    """{step: path} of the intact checkpoints under root (sizes checked, not sha256s)."""
    return scan_checkpoints(root, full=False)[0]


def verify_checkpoint(path, full: bool = True, training: bool = True) -> None:
    """Check every file against manifest.json: presence and size, and with full=True the sha256.

    A training checkpoint must hold every file of TRAINING_FILES; a model-only directory
    (`training=False`) config.json and model.safetensors, and may have no manifest at all.
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    required = TRAINING_FILES if training else ("config.json", "model.safetensors")
    if not manifest_path.is_file():
        if not training and all((path / name).is_file() for name in required):
            return  # written by hand or by an older version: nothing to check against
        raise UserError(f"checkpoint {path} is incomplete: no manifest.json")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        sizes = {name: int(entry["bytes"]) for name, entry in files.items()}
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError, ValueError, AttributeError):
        raise UserError(f"checkpoint {path} has a corrupt manifest.json") from None
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise UserError(f"checkpoint {path} is corrupt: its manifest does not list {', '.join(unlisted)}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"checkpoint {path} is incomplete: {name} is missing")
        size = file.stat().st_size
        if size != sizes[name]:
            raise UserError(f"checkpoint {path} is corrupt: {name} has {size} bytes, expected {sizes[name]}")
        if full and io.file_sha256(file) != expected.get("sha256"):
            raise UserError(f"checkpoint {path} is corrupt: {name} does not match its sha256")


def latest_checkpoint(root) -> Path | None:
    """The newest checkpoint whose files are all present and intact, or None."""
    intact, damaged = scan_checkpoints(root, full=True)
    for path, reason in damaged.items():
        logger.warning("skipping checkpoint: %s", reason)
    return intact[max(intact)] if intact else None


def resume_point(root) -> Path | None:
    """The checkpoint a run resumes from: the newest intact one, None in a run without checkpoints,
    and a refusal when every checkpoint is damaged (starting over would overwrite the run's log)."""
    intact, damaged = scan_checkpoints(root, full=True)
    for path, reason in damaged.items():
        logger.warning("skipping checkpoint: %s", reason)
    if damaged and not intact:
        raise UserError(f"every checkpoint in {root} is damaged ({', '.join(p.name for p in damaged)}); nothing was "
                        "changed. To start over on purpose, pass a new --out")
    return intact[max(intact)] if intact else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory as given, or the newest intact checkpoint of a run directory."""
    path = Path(path).expanduser()
    if is_checkpoint_dir(path):
        return path
    if RunDir.holds_run(path):
        latest = latest_checkpoint(RunDir(path).checkpoints)
        if latest is None:
            raise UserError(f"run {path} has no intact checkpoint in {RunDir(path).checkpoints}")
        return latest
    raise UserError(f"{path} is neither a gpt2repro checkpoint (config.json with format gpt2repro) nor a run directory")
