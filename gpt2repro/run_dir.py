"""The run directory (`train --out RUN`): the one place that knows its layout.

    RUN/config.json         the resolved TrainConfig of the latest invocation
    RUN/log.jsonl           one JSON object per line: step records, evaluation records
    RUN/samples.txt         samples written at each sampling step
    RUN/checkpoints/        step_NNNNNN/ checkpoints (checkpoint.py owns their contents)
    RUN/tensorboard/        TensorBoard events, when log_with names it
"""

from __future__ import annotations

import json
from pathlib import Path

from . import io
from .errors import UserError


class RunDir:
    def __init__(self, path):
        self.path = Path(path).expanduser()
        self.config = self.path / "config.json"
        self.log = self.path / "log.jsonl"
        self.samples = self.path / "samples.txt"
        self.checkpoints = self.path / "checkpoints"
        self.tensorboard = self.path / "tensorboard"

    @staticmethod
    def holds_run(path) -> bool:
        return (Path(path).expanduser() / "checkpoints").is_dir()

    def create(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        io.write_json(self.config, config)

    def read_log(self) -> list[dict]:
        """The records of log.jsonl in order (a torn last line skipped), each with an integer step."""
        if not self.log.is_file():
            raise UserError(f"{self.log} does not exist; is {self.path} a run directory?")
        records = io.read_jsonl(self.log)
        for record in records:
            if not isinstance(record.get("step"), int):
                raise UserError(f"{self.log}: expected JSON objects with an integer 'step', got {record}")
        return records

    def append_log(self, record: dict) -> None:
        io.append_jsonl(self.log, record)

    def truncate_log(self, step: int) -> None:
        """Drop the records of steps >= `step` (done after the checkpoint a run resumes from), atomically."""
        if not self.log.is_file():
            return
        kept = [r for r in io.read_jsonl(self.log) if isinstance(r.get("step"), int) and r["step"] < step]
        io.write_text(self.log, "".join(json.dumps(r) + "\n" for r in kept))

    def append_samples(self, step: int, texts: list[str]) -> None:
        with open(self.samples, "a", encoding="utf-8") as f:
            f.write("".join(f"step {step}: {t}\n" for t in texts))


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged again after a resume keeps its latest value."""
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]
