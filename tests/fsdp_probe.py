"""Run under accelerate_configs/cpu_fsdp_2proc.yaml by tests/test_fsdp.py: resume a run under FSDP2 and
check what the log cannot show. Writes one JSON line per process to OUT.rank.

    accelerate launch --config_file accelerate_configs/cpu_fsdp_2proc.yaml tests/fsdp_probe.py DATA RUN OUT SETTINGS...
"""

import json
import sys

from torch.distributed.tensor import DTensor

from gpt2repro.config import load_train_config
from gpt2repro.train import Trainer

data, run, out, *settings = sys.argv[1:]
trainer = Trainer(load_train_config("tiny", None, settings), data, run)
live = {id(p) for p in trainer.model.parameters()}
state = trainer.optimizer.optimizer.state
report = {
    "resumed_step": trainer.step,
    "all_dtensors": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
    "parameters": len(live),
    "state_entries": len(state),
    "entries_on_live_parameters": sum(id(p) in live for p in state),
    "moments_sharded": all(isinstance(s["exp_avg"], DTensor) for s in state.values()),
}
with open(f"{out}.{trainer.rank}", "w") as f:
    f.write(json.dumps(report) + "\n")
