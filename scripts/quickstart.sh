#!/usr/bin/env bash
# From a fresh machine to a trained small GPT-2 in about 5 minutes of training, on CPU or GPU:
#   1. a virtualenv with gpt2repro installed (.venv, reused if present)
#   2. tiny Shakespeare downloaded once (cached in ~/.cache/gpt2repro), or the text file given as $1
#   3. `gpt2repro prepare` -> data/quickstart, `gpt2repro train` -> runs/quickstart: preset `tiny` on a
#      CPU (4 layers x 128), `small` on a GPU (6 layers x 384, compiled)
#   4. samples, an HF export in runs/quickstart/hf, and a `transformers.pipeline` generating from it
# Usage: bash scripts/quickstart.sh [TEXT_FILE]
set -euo pipefail
TEXT=${1:-}
case "$TEXT" in "" | /*) ;; *) TEXT=$PWD/$TEXT ;; esac  # a path relative to where the script was started
cd "$(dirname "$0")/.."

# preflight, before the slow install: the text to train on, downloaded now if it is not cached
if [ -n "$TEXT" ]; then
  [ -s "$TEXT" ] || { echo "quickstart: no text file at $TEXT" >&2; exit 1; }
else
  TEXT=${XDG_CACHE_HOME:-$HOME/.cache}/gpt2repro/tinyshakespeare.txt
  if [ ! -s "$TEXT" ]; then
    mkdir -p "$(dirname "$TEXT")"
    URL=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
    curl -fsL --connect-timeout 5 --max-time 120 -o "$TEXT.part" "$URL" && mv "$TEXT.part" "$TEXT" || {
      rm -f "$TEXT.part"
      echo "quickstart: cannot download $URL (offline?); pass a text file instead, e.g. the excerpt in this repository: bash scripts/quickstart.sh $PWD/tests/fixtures/tinyshakespeare.txt" >&2
      exit 1
    }
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  bash scripts/install_torch.sh .venv/bin/python  # TORCH_SPEC pins a build; the CPU wheel where there is no GPU driver
  .venv/bin/python -m pip install --quiet -e .
fi
PY=.venv/bin/python

$PY -m gpt2repro prepare --source "$TEXT" --out data/quickstart --val-tokens 32768 --shard-size 10000000
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
PRESET=tiny; [ -n "$DEVICE" ] && PRESET=small
START=$SECONDS
$PY -m gpt2repro train --preset $PRESET --data data/quickstart --out runs/quickstart || {
  status=$?  # 75: stopped early (SIGTERM) with a checkpoint saved; nothing half-trained is exported
  [ "$status" -eq 75 ] && echo "quickstart: stopped early: rerun to resume" >&2
  exit "$status"
}
TRAINED=$((SECONDS - START))
$PY -m gpt2repro export runs/quickstart --out runs/quickstart/hf
$PY - <<'PY'
from transformers import pipeline

generator = pipeline("text-generation", model="runs/quickstart/hf")
for out in generator("ROMEO:", max_new_tokens=40, do_sample=True, top_k=50, num_return_sequences=2):
    print("---", out["generated_text"], sep="\n")
PY
echo "run: runs/quickstart (log.jsonl, samples.txt, checkpoints/)   HF model: runs/quickstart/hf"
echo "quickstart: preset $PRESET trained in $((TRAINED / 60))m$(printf %02d $((TRAINED % 60)))s on ${DEVICE:-$(nproc) CPU cores}, start-up and evaluation included"
