"""Training checkpoints: safetensors and JSON only, written atomically, validated on load.

    RUN/checkpoints/step_000500/
        config.json            {"format": "gpt2repro", "model": {GPTConfig fields}}
        model.safetensors      weights of the unwrapped, uncompiled GPT (tied lm_head stored once)
        optimizer.safetensors  AdamW moment tensors, named state.<param index>.<key>
        optimizer.json         param groups and non-tensor optimizer state
        trainer_state.json     step, tokens seen, data-loader state, train config, RNG state of every rank
        manifest.json          size and sha256 of every file above; written last

Nothing here needs pickle to load, so a downloaded checkpoint cannot run code. A checkpoint is
written into `step_NNNNNN.tmp` and renamed when complete; the manifest lets a reader reject a
directory damaged afterwards and fall back to the previous one.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .errors import UserError
from .files import file_sha256
from .model import GPT

logger = logging.getLogger(__name__)

FORMAT = "gpt2repro"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# the model alone: config.json + model.safetensors


def save_model_dir(model: GPT, path: Path) -> None:
    """Weights and shape of a GPT (pass the unwrapped, uncompiled module)."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    _write_json(path / "config.json", {"format": FORMAT, "model": dataclasses.asdict(model.config)})


def is_checkpoint_dir(path) -> bool:
    config = Path(str(path)).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_model_dir(path, verify: bool = True) -> GPT:
    """A GPT from a checkpoint directory, after checking its files against the manifest."""
    path = Path(path).expanduser()
    if verify:
        verify_checkpoint(path)
    try:
        config = GPTConfig(**json.loads((path / "config.json").read_text())["model"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} has an unreadable config.json ({e})") from None
    model = GPT(config)
    model.load_weights(_load_tensors(path / "model.safetensors"), source=f"checkpoint {path}")
    return model


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


# ---------------------------------------------------------------------------------------------
# optimizer state without pickle


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
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
# RNG state as JSON


def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and (if any) CUDA generator states."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# ---------------------------------------------------------------------------------------------
# full training checkpoints


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def save_checkpoint(
    root: Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep: int = 3,
    pinned: tuple[int, ...] = (),
) -> Path:
    """Write step_NNNNNN atomically, then delete old checkpoints beyond the newest `keep` (pinned stay).

    `trainer_state` must be JSON-serialisable (step, tokens, data-loader state, config, RNG states).
    Call on one process only, with the unwrapped model and full optimizer state.
    """
    root = Path(root)
    final = checkpoint_path(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(model, tmp)
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
    _write_json(tmp / "optimizer.json", meta)
    _write_json(tmp / "trainer_state.json", trainer_state)
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in files}
    _write_json(tmp / "manifest.json", {"format": FORMAT, "step": step, "files": manifest})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _prune(root, keep, set(pinned))
    return final


def _prune(root: Path, keep: int, pinned: set[int]) -> None:
    steps = sorted(list_checkpoints(root, validate=False))
    for step in steps[:-keep] if keep > 0 else steps:
        if step not in pinned:
            shutil.rmtree(checkpoint_path(root, step), ignore_errors=True)


def list_checkpoints(root: Path, validate: bool = True) -> dict[int, Path]:
    """Complete checkpoints under root by step (temp dirs of interrupted writes are never listed)."""
    root = Path(root)
    found = {}
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and path.is_dir():
                if validate:
                    try:
                        verify_checkpoint(path, full=False)
                    except UserError as e:
                        logger.warning("skipping checkpoint: %s", e)
                        continue
                found[int(match.group(1))] = path
    return found


def verify_checkpoint(path: Path, full: bool = True) -> None:
    """Check every file against manifest.json: presence and size, and with full=True the sha256."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        # an exported model dir (config.json + model.safetensors) has no manifest; that is fine for weights
        if (path / "model.safetensors").is_file() and not (path / "trainer_state.json").exists():
            return
        raise UserError(f"checkpoint {path} is incomplete: no manifest.json")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise UserError(f"checkpoint {path} has a corrupt manifest.json") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"checkpoint {path} is incomplete: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise UserError(f"checkpoint {path} is corrupt: {name} has {size} bytes, expected {expected['bytes']}")
        if full and file_sha256(file) != expected["sha256"]:
            raise UserError(f"checkpoint {path} is corrupt: {name} does not match its sha256")


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose files are all present and intact, or None."""
    for step, path in sorted(list_checkpoints(root).items(), reverse=True):
        try:
            verify_checkpoint(path, full=True)
            return path
        except UserError as e:
            logger.warning("skipping checkpoint: %s", e)
    return None


def load_checkpoint(path: Path, model: GPT, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore weights (and optimizer state) in place; return trainer_state.json's contents."""
    path = Path(path)
    verify_checkpoint(path)
    saved = GPTConfig(**json.loads((path / "config.json").read_text())["model"])
    if saved != model.config:
        raise UserError(f"checkpoint {path} was written for {saved}, not for this run's {model.config}")
    model.load_weights(_load_tensors(path / "model.safetensors"), source=f"checkpoint {path}")
    if optimizer is not None:
        meta = json.loads((path / "optimizer.json").read_text())
        state = _optimizer_from_files(_load_tensors(path / "optimizer.safetensors"), meta)
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"checkpoint {path} has optimizer state that does not fit this model: {e}") from None
    return json.loads((path / "trainer_state.json").read_text())
