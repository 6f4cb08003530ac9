#!/usr/bin/env bash
# Accelerator benchmarks (benchmarks/device.py: training MFU side by side with HF transformers, the MoE
# step's profile, 16 -> 128 experts, V2-Lite decoding, speculative == greedy, MLA attention kernels);
# writes benchmarks/results/device.md. Extra arguments go to device.py (e.g. --parts=decode, --shrink).
#
# On a GPU machine with jax[cuda], torch and transformers, from the repository root:
#   bash benchmarks/device.sh --parts=train,profile,scaling      # ~6 minutes on an H200 (estimates)
#   bash benchmarks/device.sh --parts=decode,speculative,attention  # ~7 minutes
# (all parts in one command: ~12.5 minutes; --budget_s, 570 s, skips the parts that would start past
# it). Each part runs in its own process; the file keeps the sections of parts a run leaves out.
# Packages the machine lacks (tokamax, qwix, grain, ml_collections, tensorboardX and their needs) are
# installed from wheels in .whl/ when present; on a machine that can reach PyPI, fetch them with
#   bash benchmarks/device.sh --fetch-wheels
# (for Python 3.12 on x86-64 Linux; WHEEL_PYTHON=3.11 for another version). A machine with network
# access can instead `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(tokamax==0.0.12 qwix==0.1.8 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0
        tensorboardX==2.6.5 einshape==1.0 immutabledict==4.3.1 pydantic==2.13.4 pydantic_core==2.46.4
        annotated_types==0.7.0 typing_inspection==0.4.2 typeguard==2.13.3)
if [[ "${1:-}" == --fetch-wheels ]]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
  exit
fi
if ! python3 -c 'import tokamax, qwix, grain, ml_collections, tensorboardX' 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "tokamax, qwix, grain, ml_collections or tensorboardX is missing and .whl/ holds no wheels:" \
         "pip install -e . (or fetch wheels: bash benchmarks/device.sh --fetch-wheels)" >&2
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dsjax_site \
    .whl/*.whl
  export PYTHONPATH="/tmp/dsjax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# XLA may grow to most of the memory (the default 75% can be too little for the MoE at batch 8), but on
# demand, not up front: the PyTorch rows run in the same processes and need the device's memory too.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export PYTHONUNBUFFERED=1
python3 -c 'import jax; d = jax.devices(); print(len(d), "device(s):", d[0].platform, d[0].device_kind)'
if [[ " $* " != *" --shrink "* ]] && ! python3 -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")'; then
  echo "No accelerator visible to jax; use --shrink to check the script on CPU." >&2
  exit 1
fi
python3 benchmarks/device.py "$@"
