"""Our training step replayed as a CUDA graph against the same step launched eagerly, in one process.

    python scripts/bench_graph.py [--model gpt2] [--batch 64] [--rounds 5] [--steps 10]

Both trainers are built from the same config (`cuda_graph` true and false) and timed in alternating
rounds of `--steps` steps, so the GPU clock's drift under its power cap falls on both alike; one
process per lever (scripts/bench_levers.py) cannot separate a 1% difference from that drift.
Prints one JSON line: each round's median ms per step for both, and the median over all steps.
"""

import argparse
import json
import statistics

import torch

from gpt2repro.bench import _time_steps, bench_setup, training_step

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="a model preset (gpt2, gpt2-medium, gpt2-xl); default the 124M")
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

steps, times = {}, {}
for name, graph in (("graph", "true"), ("eager", "false")):
    cfg, tokens = bench_setup(args.batch, model=args.model, overrides=[f"cuda_graph={graph}"])
    trainer, steps[name] = training_step(cfg, tokens)
    _time_steps(steps[name], 3, 1, trainer.device)  # compilation, and the graph's capture
    times[name] = []
for _ in range(args.rounds):
    for name, step in steps.items():
        times[name].append(_time_steps(step, 1, args.steps, torch.device("cuda"))[1])
result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model or "gpt2",
          "batch": args.batch, "rounds": args.rounds, "steps_per_round": args.steps}
for name, rounds in times.items():
    result[f"{name}_round_ms"] = [round(statistics.median(r), 2) for r in rounds]
    result[f"{name}_ms"] = round(statistics.median(t for r in rounds for t in r), 2)
result["speedup"] = round(result["eager_ms"] / result["graph_ms"], 4)
print(json.dumps(result))
