#!/usr/bin/env bash
# The full GPT-2 (124M) reproduction: FineWeb-Edu sample-10BT (~10B GPT-2 tokens), 19,073 steps of
# 2**19 tokens on 8 GPUs, HellaSwag every 250 steps, then a final evaluation and a Hugging Face export.
#
#   bash scripts/gpt2_124M_fineweb.sh [NUM_GPUS]      # default 8; any count that divides 2**19/(64*1024) = 8
#
# Disk: ~20 GB of uint16 shards in data/fineweb-edu-10B. Time: the prepare step is CPU-bound (about an
# hour on 32 cores); training takes about 2 hours on 8 H100s at ~1.5M tokens/s. Rerunning the script
# resumes both the prepare and the training from where they stopped (checkpoints every 5000 steps; lower
# checkpoint_every with --set on preemptible machines); a training run stopped early (SIGTERM,
# stop_after_steps) ends the script with exit status 75. Extra arguments after NUM_GPUS go to `train`,
# e.g. `bash scripts/gpt2_124M_fineweb.sh 8 --set log_with=wandb`.
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS=${1:-8}
shift || true
DATA=${DATA:-data/fineweb-edu-10B}
RUN=${RUN:-runs/gpt2-124M}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

# 1. tokenize once: the first 100M tokens are the validation shard, the rest 99 training shards
gpt2repro prepare --source HuggingFaceFW/fineweb-edu --name sample-10BT --out "$DATA" \
  --shard-size 100000000 --val-tokens 100000000

# 2. train: the seeds' recipe (see `gpt2-124M` in gpt2repro/config.py); HellaSwag is downloaded once.
# A run stopped before max_steps (SIGTERM, e.g. preemption, or --set stop_after_steps=N) saves a
# checkpoint and exits with status 75, which `accelerate launch` turns into 1; its output tells them
# apart. Stopped early, this script exits 75 before the evaluation and export. tee ignores SIGTERM so
# that training, still printing while it saves, never writes into a closed pipe.
TRAIN_OUT=$(mktemp)
trap 'rm -f "$TRAIN_OUT"' EXIT
status=0
accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes "$GPUS" \
  -m gpt2repro train --preset gpt2-124M --data "$DATA" --out "$RUN" "$@" \
  | (trap '' INT TERM; exec tee "$TRAIN_OUT") || status=$?
if [ "$status" -ne 0 ]; then
  if [ "$status" -eq 75 ] || grep -Eq "^stopped after step [0-9]+ .*exit status 75" "$TRAIN_OUT"; then
    echo "stopped early: rerun to resume: bash scripts/gpt2_124M_fineweb.sh $GPUS $*" >&2
    exit 75
  fi
  exit "$status"
fi

# 3. final numbers (validation loss on 100 windows, HellaSwag acc / acc_norm) and the export
gpt2repro eval --model "$RUN" --hellaswag auto --data "$DATA" --json | tee "$RUN/final_eval.json"
gpt2repro export "$RUN" --out "$RUN/hf"
gpt2repro plot "$RUN" --out "$RUN/curves.png"
echo "done: $RUN/hf is a transformers model directory; push it with: gpt2repro push $RUN/hf --repo-id USER/NAME"
