"""The training state as plain dicts: full (unsharded) weights and optimizer state, RNG states as JSON.

Under FSDP2 every rank holds a shard; `torch.distributed.checkpoint.state_dict` gathers full tensors
(every rank must call it) and puts them back into shards. The optimizer state is keyed by parameter
index in the order of `param_names`, as `torch.optim.Optimizer.state_dict` keys it, so one checkpoint
resumes under FSDP, DDP and in one process alike.
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU
SCATTER = StateDictOptions(full_state_dict=True)  # every rank passes the full state and keeps its shard


def model_state(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """Full weights (under FSDP: on the main process only; call on every process)."""
    if sharded:
        return get_model_state_dict(model, options=GATHER)
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], sharded: bool) -> None:
    if sharded:
        set_model_state_dict(model, weights, options=SCATTER)
    else:
        model.load_weights(weights)


def optimizer_state(model, optimizer, param_names: list[str], sharded: bool) -> dict:
    """The optimizer's full state_dict keyed by parameter index (call on every process)."""
    if not sharded:
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if not by_name:  # not the main process
        return {}
    index = {name: i for i, name in enumerate(param_names)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return {"state": {index[name]: s for name, s in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(model, optimizer, state: dict, param_names: list[str], sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    groups = [{**group, "params": [param_names[i] for i in group["params"]]} for group in state["param_groups"]]
    by_name = {"state": {param_names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=SCATTER)


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


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
