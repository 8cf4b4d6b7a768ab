"""Two configurations of our training step timed against each other in one process.

    python scripts/bench_ab.py [--a SETTINGS] [--b SETTINGS] [--model gpt2] [--batch 64] [--rounds 5] [--steps 10]

SETTINGS are comma-separated `--set` overrides (empty: the default step); by default `a` is the step as
`train` runs it and `b` the same step launched eagerly (cuda_graph=false). Both trainers are built in
this process and timed in alternating rounds of `--steps` steps, so the GPU clock's drift under its
power cap falls on both alike; one process per lever (scripts/bench_levers.py) cannot separate a 1%
difference from that drift. Prints one JSON line: each round's median ms per step for both, the median
over all steps, and b's time over a's.
"""

import argparse
import json
import statistics

import torch

from gpt2repro.bench import _time_steps, bench_setup, training_step

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--a", default="", help="comma-separated --set overrides of the first step")
parser.add_argument("--b", default="cuda_graph=false", help="comma-separated --set overrides of the second step")
parser.add_argument("--model", default=None, help="a model preset (gpt2, gpt2-medium, gpt2-xl); default the 124M")
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

steps, times = {}, {}
for name in ("a", "b"):
    cfg, tokens = bench_setup(args.batch, model=args.model, overrides=[s for s in getattr(args, name).split(",") if s])
    trainer, steps[name] = training_step(cfg, tokens)
    _time_steps(steps[name], 3, 1, trainer.device)  # compilation, and the graph's capture
    times[name] = []
for _ in range(args.rounds):
    for name, step in steps.items():
        times[name].append(_time_steps(step, 1, args.steps, torch.device("cuda"))[1])
result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model or "gpt2",
          "batch": args.batch, "rounds": args.rounds, "steps_per_round": args.steps, "a": args.a, "b": args.b}
for name, rounds in times.items():
    result[f"{name}_round_ms"] = [round(statistics.median(r), 2) for r in rounds]
    result[f"{name}_ms"] = round(statistics.median(t for r in rounds for t in r), 2)
result["b_over_a"] = round(result["b_ms"] / result["a_ms"], 4)
print(json.dumps(result))
