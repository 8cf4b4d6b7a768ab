"""How this process trains, read from the launcher: CPU or GPU, mixed precision, DDP or FSDP2.

Hardware and precision live in `accelerate_configs/*.yaml`; `accelerate launch` turns them into
environment variables that the Accelerator reads. One gap is filled here: with `use_cpu`,
Accelerate turns `distributed_type: FSDP` into plain multi-process CPU training (DDP), although
FSDP2's `fully_shard` runs on gloo. An FSDP config on CPU is made to shard for real, so that
`accelerate_configs/cpu_fsdp_2proc.yaml` tests what the GPU configs run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration, is_tensorboard_available, is_wandb_available, parse_flag_from_env

from ..config import TrainConfig
from ..errors import UserError

# trackers `log_with` may name, and how to tell that their package is installed
TRACKERS = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}


def use_cpu() -> bool:
    """Train on the CPU: asked for by the launcher (`use_cpu: true`), or no GPU to train on.

    Decided before the first `PartialState`, which picks the process-group backend (gloo on CPU).
    """
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def fsdp_requested() -> bool:
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def resolve_mixed_precision(setting: str) -> str:
    """"auto": the launcher's choice if `accelerate launch` made one, else bf16 on a GPU that has it."""
    if setting != "auto":
        return setting
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def world_size() -> int:
    return PartialState(cpu=use_cpu()).num_processes


def check_fsdp() -> None:
    """Refuse, before any model is built, an FSDP launch this install cannot run."""
    if not fsdp_requested():
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("only FSDP2 is supported: set fsdp_version: 2 in the accelerate config "
                        "(accelerate_configs/fsdp.yaml does)")
    if not torch.distributed.is_available():
        raise UserError("FSDP needs torch.distributed, which this torch build lacks")
    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        raise UserError(f"FSDP2 needs torch.distributed.fsdp.fully_shard, which torch {torch.__version__} "
                        "lacks; install torch 2.6 or newer")


def make_accelerator(cfg: TrainConfig, grad_accum_steps: int, run_dir: Path | None) -> Accelerator:
    trackers = None
    if cfg.log_with:
        if cfg.log_with in TRACKERS and not TRACKERS[cfg.log_with]():
            # Accelerate would only warn and log nowhere
            raise UserError(f"log_with={cfg.log_with} needs the {cfg.log_with} package: pip install {cfg.log_with}")
        trackers = "all" if cfg.log_with == "all" else [cfg.log_with]
    check_fsdp()
    fsdp = None
    if fsdp_requested():  # the launcher's FSDP_* settings, and the recipe's arithmetic under every engine:
        # fp32 weights gathered and gradients reduced in fp32, bf16 matmuls by autocast (as in DDP), not
        # Accelerate's default of bf16 weights and bf16 gradient reduction
        fp32 = torch.distributed.fsdp.MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        fsdp = FullyShardedDataParallelPlugin(mixed_precision_policy=fp32)
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum_steps,
        cpu=use_cpu(),
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"))
        if run_dir is not None else None,
        fsdp_plugin=fsdp,
    )
    if fsdp is not None and accelerator.distributed_type != DistributedType.FSDP:
        if not torch.distributed.is_initialized():
            raise UserError("FSDP needs a process group: start training with accelerate launch --config_file "
                            "accelerate_configs/fsdp.yaml (or cpu_fsdp_2proc.yaml on CPU)")
        # Accelerate maps FSDP to DDP on CPU; fully_shard works on a gloo process group, so shard for real
        for state in (PartialState._shared_state, AcceleratorState._shared_state):
            state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = fsdp
    return accelerator


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP
