"""Profile optimizer steps of the real training loop (`Trainer.fit`) and report where the GPU idles.

    python scripts/profile_train.py --data DIR [--preset gutenberg-short] [--skip 4] [--steps 3] [--out FILE]

Runs the preset for skip + 1 + steps optimizer steps with validation, samples and HellaSwag off,
profiles the last `steps` (CPU and CUDA activity), and writes the idle gaps between consecutive
kernels, grouped by the kernel after the gap and the top-level CPU op that ran during it.
"""

import argparse
import collections
import logging
import tempfile

import torch

from gpt2repro.presets import TRAIN_PRESETS
from gpt2repro.train import Trainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True, help="a directory written by `gpt2repro prepare`")
parser.add_argument("--preset", default="gutenberg-short")
parser.add_argument("--skip", type=int, default=4, help="unprofiled steps first (compilation happens there)")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--out", default="profile_train.txt")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")

cfg = TRAIN_PRESETS[args.preset]()
cfg.max_steps = args.skip + 1 + args.steps
cfg.val_every = cfg.sample_every = cfg.hellaswag_every = cfg.checkpoint_every = 0
trainer = Trainer(cfg, args.data, run_dir=tempfile.mkdtemp(prefix="profile_train_"))
activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
prof = torch.profiler.profile(activities=activities,
                              schedule=torch.profiler.schedule(wait=args.skip, warmup=1, active=args.steps))
train_step = trainer.train_step


def profiled_step():
    stats = train_step()
    prof.step()
    return stats


trainer.train_step = profiled_step
prof.start()
trainer.fit()
prof.stop()

events = prof.events()
if not any(e.device_type == torch.autograd.DeviceType.CUDA for e in events):
    raise SystemExit("no CUDA kernels were recorded: this profile needs a GPU")
kernels = sorted({(e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA})
cpu_ops = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                 if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None)
span = (kernels[-1][1] - kernels[0][0]) / 1000 / args.steps
gaps, counts = collections.Counter(), collections.Counter()
for (_, end, _), (start, _, name) in zip(kernels, kernels[1:]):
    if start - end > 30:  # microseconds
        during = " / ".join(dict.fromkeys(n for a, b, n in cpu_ops if a < start and b > end))
        key = (name[:60], during[:100])
        gaps[key] += (start - end) / 1000 / args.steps
        counts[key] += 1
lines = [f"{args.preset}: {args.steps} profiled optimizer steps of {trainer.grad_accum_steps} micro-steps",
         f"first to last kernel: {span:.1f} ms per step; idle gaps over 30 us: {sum(gaps.values()):.2f} ms per step",
         "   ms/step  count  before kernel | top-level CPU op during the gap"]
lines += [f"{ms:10.2f} {counts[key]:6d}  {key[0]} | {key[1]}" for key, ms in gaps.most_common(20)]
with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
