"""Training: a thin Accelerate loop (trainer.py) over parts that each own one thing: the launch
(launch.py), the optimiser and schedule (optim.py), the state as dicts (state.py), checkpoint and stop
policy (policy.py), evaluation hooks (hooks.py), and what is shown and logged (metrics.py)."""

from .optim import build_optimizer, decay_groups, get_lr
from .trainer import EXIT_STOPPED_EARLY, Trainer, train

__all__ = ["EXIT_STOPPED_EARLY", "Trainer", "build_optimizer", "decay_groups", "get_lr", "train"]
