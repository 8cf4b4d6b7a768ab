#!/usr/bin/env bash
# From a fresh machine to a trained (tiny) GPT-2 in a few minutes, on CPU or GPU:
#   1. a virtualenv with gpt2repro installed (.venv, reused if present)
#   2. tiny Shakespeare downloaded once (cached in ~/.cache/gpt2repro), or the text file given as $1
#   3. `gpt2repro prepare` -> data/shakespeare, `gpt2repro train --preset tiny` -> runs/quickstart
#   4. samples, an HF export in runs/quickstart/hf, and a `transformers.pipeline` generating from it
# Usage: bash scripts/quickstart.sh [TEXT_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  # TORCH_SPEC pins a build (e.g. torch==2.13.0); otherwise the CPU wheel where there is no GPU driver
  if [ -n "${TORCH_SPEC:-}" ] || command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch}"
  else
    .venv/bin/python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu \
      || .venv/bin/python -m pip install --quiet torch
  fi
  .venv/bin/python -m pip install --quiet -e .
fi
PY=.venv/bin/python

TEXT=${1:-}
if [ -z "$TEXT" ]; then
  TEXT=${XDG_CACHE_HOME:-$HOME/.cache}/gpt2repro/tinyshakespeare.txt
  if [ ! -s "$TEXT" ]; then
    mkdir -p "$(dirname "$TEXT")"
    URL=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
    curl -fsL --retry 2 -o "$TEXT.part" "$URL" && mv "$TEXT.part" "$TEXT" || {
      rm -f "$TEXT.part"
      echo "quickstart: cannot download $URL (offline?); run: bash scripts/quickstart.sh PATH_TO_ANY_TEXT_FILE" >&2
      exit 1
    }
  fi
fi

$PY -m gpt2repro prepare --source "$TEXT" --out data/quickstart --val-tokens 32768 --shard-size 10000000
$PY -m gpt2repro train --preset tiny --data data/quickstart --out runs/quickstart
$PY -m gpt2repro export runs/quickstart --out runs/quickstart/hf
$PY - <<'PY'
from transformers import pipeline

generator = pipeline("text-generation", model="runs/quickstart/hf")
for out in generator("ROMEO:", max_new_tokens=40, do_sample=True, top_k=50, num_return_sequences=2):
    print("---", out["generated_text"], sep="\n")
PY
echo "run: runs/quickstart (log.jsonl, samples.txt, checkpoints/)   HF model: runs/quickstart/hf"
