#!/bin/bash
# llm_small's train step (dsjax vs PyTorch, benchmarks/train_step.py) under each XLA CPU library flag:
# default, no XNNPACK/YNNPACK (Eigen dots), oneDNN matmuls, YNNPACK dots, XNNPACK dot+eltwise fusions,
# XNNPACK greedy graph fusion.
# One process per flag set (XLA reads XLA_FLAGS once); PyTorch in each is the common reference.
# Run from the repository root: bash benchmarks/xla_flags.sh > benchmarks/results/xla_flags.md
# (SHAPES=llm_small,v3_small for both shapes; ~1 min per flag set for llm_small on 2 idle cores).
set -euo pipefail
echo "# Train step under XLA CPU flags ($(date -u +%F), load $(cut -d' ' -f1-3 /proc/loadavg), 2 threads, float32)"
echo
echo '| XLA_FLAGS | shape | model | tokens/step | dsjax tok/s | torch tok/s | dsjax / torch | dsjax MFU | torch MFU | GFLOP/step |'
echo '|---|---|---|---|---|---|---|---|---|---|'
for f in "" "--xla_cpu_use_xnnpack=false" "--xla_cpu_use_onednn=true" "--xla_cpu_experimental_ynn_fusion_type=individual_dot" \
         "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise" \
         "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"; do
  XLA_FLAGS="$f" python benchmarks/train_step.py --shapes="${SHAPES:-llm_small}" --out='' --repeats=3 --steps=2 2>&1 |
    grep -E '^\| (llm|v3)' | sed "s/^|/| \`${f:-(default)}\` |/" || echo "| \`$f\` | failed |"
done
