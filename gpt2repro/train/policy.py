"""When to checkpoint and when to stop: the cadence, `stop_after_steps` and SIGTERM."""

from __future__ import annotations

import signal

from ..config import TrainConfig


class CheckpointPolicy:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.sigterm_received = False  # set by the handler; acted on once all processes agree

    def install_sigterm_handler(self):
        """Catch SIGTERM until the returned function restores the previous handler."""
        def request_stop(signum, frame):
            self.sigterm_received = True

        try:
            previous = signal.signal(signal.SIGTERM, request_stop)
        except ValueError:  # not the main thread (e.g. inside a test harness)
            return lambda: None
        return lambda: signal.signal(signal.SIGTERM, previous)

    def stop_after(self, steps_this_run: int) -> bool:
        return bool(self.cfg.stop_after_steps and steps_this_run >= self.cfg.stop_after_steps)

    def save_due(self, step: int, steps_this_run: int) -> bool:
        """After `step` completed steps: the end, the cadence, or a planned stop."""
        cfg = self.cfg
        return (step == cfg.max_steps or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                or self.stop_after(steps_this_run))
