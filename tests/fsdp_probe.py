"""Run under accelerate_configs/cpu_fsdp_2proc.yaml by tests/test_fsdp.py: resume a run under FSDP2 and
check what the log cannot show. Writes one JSON line per process to OUT.rank.

    accelerate launch --config_file accelerate_configs/cpu_fsdp_2proc.yaml tests/fsdp_probe.py DATA RUN OUT SETTINGS...
"""

import json
import sys

import torch

from torch.distributed.tensor import DTensor

from gpt2repro.presets import load_train_config
from gpt2repro.train import Trainer

data, run, out, *settings = sys.argv[1:]
trainer = Trainer(load_train_config("tiny", None, settings), data, run)
dtypes = []
trainer.unwrapped.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
tokens = torch.randint(0, 50257, (trainer.cfg.micro_batch_size, trainer.cfg.seq_len + 1))
trainer.accumulate_gradients([(tokens[:, :-1], tokens[:, 1:])])  # gradients are dropped by the next zero_grad
live = {id(p) for p in trainer.model.parameters()}
state = trainer.optimizer.optimizer.state
report = {
    "resumed_step": trainer.step,
    "all_dtensors": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
    "parameters": len(live),
    "state_entries": len(state),
    "entries_on_live_parameters": sum(id(p) in live for p in state),
    "moments_sharded": all(isinstance(s["exp_avg"], DTensor) for s in state.values()),
    "matmul_dtype": str(dtypes[0]),  # under mixed precision the sharded model's matmuls run in it
}
with open(f"{out}.{trainer.rank}", "w") as f:
    f.write(json.dumps(report) + "\n")
