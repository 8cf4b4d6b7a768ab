"""kill -9 a tiny training run at random moments, over and over, and check that no work is ever lost.

    python scripts/fault_campaign.py --minutes 3            # prepares tests/fixtures/tinyshakespeare.txt
    python scripts/fault_campaign.py --data DIR --steps 12 --seed 1

One uninterrupted run gives the reference losses. Then, until the time is up, each trial trains the
same tiny model with a checkpoint after every step (checkpoint_every=1) and SIGKILLs it, again and
again, each time at a random moment: half of the kills at a uniformly random time within three steps
of the process's first step line, half 0-30 ms after the checkpoint write (`step_N.tmp`, about 50 ms
here) that follows its first, second or third step line is seen to begin. After each kill
it checks that

  - the newest checkpoint that passes the full sha256 check loads (checkpoint.load_checkpoint),
  - the rerun (the same command) says it resumed from exactly that checkpoint (or starts afresh when
    no save had finished yet),

and reruns until the run finishes, sometimes killing the rerun too. A finished trial must have logged
the same train and validation losses as the reference, bit for bit (CPU, one thread).

Printed at the end: trials (runs taken to the end), kills, kills that landed mid-save (a
`step_N.tmp` directory of the killed process present once it was dead), kills that left a damaged
checkpoint directory (e.g. mid-delete while pruning), resumes (reruns that said they resumed from the
expected checkpoint), fresh starts (runs that trained with no checkpoint to resume from), failures.
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "seq_len=32",
         "micro_batch_size=4", "total_batch_size=512", "warmup_steps=2", "val_batches=4", "num_samples=1",
         "sample_max_new_tokens=8", "seed=7"]


def command(data: Path, run: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "gpt2repro", "train", "--preset", "tiny", "--data", str(data), "--out", str(run),
            "--set", *SMALL, f"max_steps={steps}", "checkpoint_every=1", "keep_checkpoints=2", "val_every=3",
            "sample_every=0"]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def logged(run: Path) -> list[tuple]:
    """(step, key, value) of every train and validation loss in log.jsonl, in order."""
    out = []
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        out += [(record["step"], key, record[key]) for key in ("train_loss", "val_loss") if key in record]
    return out


def temp_dirs(root: Path, since_ns: int = 0) -> list[str]:
    """Checkpoint writes (`step_N.tmp`) under root last changed at or after `since_ns` (wall clock)."""
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        try:
            if path.name.endswith(".tmp") and path.stat().st_mtime_ns >= since_ns:
                found.append(path.name)
        except FileNotFoundError:  # renamed or removed while we looked
            pass
    return found


class Output(threading.Thread):
    """Reads a process's output as it comes; counts the step lines, each printed just before a save."""

    def __init__(self, process: subprocess.Popen):
        super().__init__(daemon=True)
        self.process, self.lines, self.steps = process, [], 0
        self.start()

    def run(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self.steps += "| loss " in line

    def text(self) -> str:
        self.join()
        return "".join(self.lines)


def kill_at_random(process: subprocess.Popen, output: Output, run: Path, launched_ns: int, rng: random.Random,
                   step_seconds: float) -> str | None:
    """SIGKILL `process` at a random moment once it trains; returns the mode, or None if it finished first.

    "uniform": a uniformly random moment within 3 steps' time of its first step line; "in-save":
    after its first, second or third step line, 0-30 ms after the checkpoint write that follows
    (`step_N.tmp`, about 50 ms here) is seen to begin."""
    mode = rng.choice(["uniform", "in-save"])
    lines = 1 if mode == "uniform" else rng.randint(1, 3)
    while process.poll() is None and output.steps < lines:
        time.sleep(0.0005)
    if mode == "in-save":
        while process.poll() is None and not temp_dirs(run / "checkpoints", launched_ns):
            time.sleep(0.0002)
    deadline = time.monotonic() + (rng.uniform(0, 3 * step_seconds) if mode == "uniform" else rng.uniform(0, 0.03))
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0002)
    if process.poll() is not None:
        return None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return mode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="prepared data directory (default: prepare the test fixture)")
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to keep killing (default 3)")
    parser.add_argument("--steps", type=int, default=8, help="max_steps of the tiny run (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill times (default: random, printed)")
    parser.add_argument("--verbose", action="store_true", help="one line per (re)run")
    parser.add_argument("--work", type=Path, help="directory for the runs (default: a new temporary one)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_campaign_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    from gpt2repro.checkpoint import latest_checkpoint, load_checkpoint, scan_checkpoints
    from gpt2repro.data import prepare

    data = args.data
    if data is None:
        data = prepare([str(REPO / "tests" / "fixtures" / "tinyshakespeare.txt")], work / "data", val_tokens=4096,
                       shard_size=100_000, num_workers=1, progress=False)
    print(f"seed {seed}; runs in {work}", flush=True)

    began = time.monotonic()
    reference = subprocess.run(command(data, work / "reference", args.steps), env=env(), capture_output=True,
                               text=True, cwd=REPO)
    if reference.returncode != 0:
        print(reference.stderr[-3000:], file=sys.stderr)
        return 1
    expected = logged(work / "reference")
    step_seconds = (time.monotonic() - began) / (args.steps + 10)  # a rough step time, start-up counted as ~10 steps
    counts = dict(trials=0, kills=0, mid_save=0, damaged_left=0, resumes=0, fresh_starts=0, failures=0)
    failures = []

    def fail(message: str) -> None:
        counts["failures"] += 1
        failures.append(message)
        print("FAIL", message, flush=True)

    end = began + 60 * args.minutes
    trial = 0
    while time.monotonic() < end:
        trial += 1
        run = work / f"trial_{trial:03d}"
        root = run / "checkpoints"
        kill = True
        while True:
            newest = latest_checkpoint(root) if root.is_dir() else None  # what the (re)run must resume from
            launched_ns = time.time_ns()
            process = subprocess.Popen(command(data, run, args.steps), env=env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, cwd=REPO)
            reader = Output(process)
            killed = kill and kill_at_random(process, reader, run, launched_ns, rng, step_seconds)
            process.wait(timeout=600)
            output = reader.text()
            trained = "| loss " in output
            if newest is not None and f"resumed from {newest} at step" in output:
                counts["resumes"] += 1
            elif newest is not None and trained:
                fail(f"trial {trial}: did not resume from {newest}:\n{output[-1500:]}")
            elif newest is None and "resumed from" in output:
                fail(f"trial {trial}: resumed although no intact checkpoint existed:\n{output[-1500:]}")
            elif newest is None and trained:
                counts["fresh_starts"] += 1
            if args.verbose:
                print(f"  trial {trial}: newest {newest.name if newest else None}, killed {killed or 'no'}, "
                      f"exit {process.returncode}, left {sorted(p.name for p in root.iterdir()) if root.is_dir() else []}",
                      flush=True)
            if not killed:
                if process.returncode != 0:
                    fail(f"trial {trial}: exit status {process.returncode}:\n{output[-1500:]}")
                break
            counts["kills"] += 1
            counts["mid_save"] += bool(temp_dirs(root, launched_ns))  # a write of this process, cut short
            intact, damaged = scan_checkpoints(root) if root.is_dir() else ({}, {})
            if damaged:
                counts["damaged_left"] += 1
                print(f"trial {trial}: the kill left damaged {', '.join(p.name for p in damaged)}", flush=True)
            if intact:
                try:
                    load_checkpoint(intact[max(intact)])
                except Exception as e:  # noqa: BLE001 - any failure to load is what this looks for
                    fail(f"trial {trial}: newest intact checkpoint {intact[max(intact)]} does not load: {e}")
            kill = rng.random() < 0.75 and time.monotonic() < end  # kill the rerun too, most of the time
        counts["trials"] += 1
        got = logged(run)
        if got != expected:
            fail(f"trial {trial}: losses differ from the uninterrupted run:\n{got}\n{expected}")
        print(f"trial {trial}: done; totals {counts}", flush=True)

    print("\n" + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()), flush=True)
    for message in failures:
        print("FAILED:", message)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
