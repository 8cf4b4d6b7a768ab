#!/usr/bin/env bash
# Install torch into a Python environment: bash scripts/install_torch.sh PYTHON
#   TORCH_SPEC       what to install (default: torch), e.g. torch==2.13.0
#   TORCH_CPU_INDEX  where the CPU-only wheels are (default: PyTorch's CPU index); empty: never use it
# With an NVIDIA driver (nvidia-smi on PATH) torch comes from the default index (the CUDA build on Linux).
# Without one, the CPU build is tried first from TORCH_CPU_INDEX; if that index cannot be reached it
# gives up within seconds (--timeout 5 --retries 0) and torch comes from the default index instead.
# pip's own configuration (extra indexes, find-links, constraints) applies to both attempts.
set -euo pipefail
PY=${1:?usage: install_torch.sh PYTHON}
SPEC=${TORCH_SPEC:-torch}
CPU_INDEX=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}

if [ -n "$CPU_INDEX" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  if "$PY" -m pip install --quiet --index-url "$CPU_INDEX" --timeout 5 --retries 0 "$SPEC"; then
    exit 0
  fi
  echo "install_torch: no $SPEC from $CPU_INDEX (unreachable?); installing it from the default index" >&2
fi
"$PY" -m pip install --quiet "$SPEC"
