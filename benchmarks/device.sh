#!/usr/bin/env bash
# bf16 MFU of a ~1B dense model and a V3-style MoE (~1B activated) on one GPU; writes
# benchmarks/results/device.md. Extra arguments go to benchmarks/device.py (e.g. --shrink, --batch=4).
#
# On a fresh GPU machine, from the repository root:
#   pip install -e .
#   pip install -U "jax[cuda12]"        # or "jax[cuda13]", matching the driver (nvidia-smi)
#   bash benchmarks/device.sh
# About 3.5 minutes on an H200 (measured: the PyTorch row, the dense row and three MoE rows); the MoE rows
# need ~95 GiB of device memory at the default batch 8 x 2048 (~5B parameters in float32 with AdamW);
# pass --batch=4 or --remat=full on a smaller device.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# XLA may grow to most of the memory (the default 75% can be too little for the MoE at batch 8), but on
# demand, not up front: the PyTorch row runs first in the same process and needs the device's memory too.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
python -c 'import jax; d = jax.devices(); print(len(d), "device(s):", d[0].platform, d[0].device_kind)'
if [[ " $* " != *" --shrink "* ]] && ! python -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")'; then
  echo "No accelerator visible to jax (see the install note at the top of this script); use --shrink to check on CPU." >&2
  exit 1
fi
python benchmarks/device.py "$@"
