#!/usr/bin/env bash
# The quality evaluation behind bench/results/quality.{json,md} and the plots.
# Usage: bash bench/quality.sh [probe|ppl|niah|plots|all] [models...]
# CPU budget: on this 2-core machine the whole grid of methods x budgets x allocators
# does not fit in a session, so the committed results use the grid below: every
# method at b=0.3 and 0.5 (the headline budgets), the spectrum-3tier and PDTrim
# curves over all five budgets, 3 windows of C=1024 + M=256 tokens.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # several runs share 2 cores: 1 thread each is faster
what="${1:-all}"; shift || true
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(smollm2-135m gemma3-270m qwen2.5-coder-0.5b)
SK=.venv/bin/spectrumkv
OUT=${QUALITY_OUT:-bench/results/quality.json}
PPL=(--windows "${PPL_WINDOWS:-3}" --context 1024 --continuation 256 --out "$OUT")
for m in "${models[@]}"; do
  if [[ $what == probe || $what == all ]]; then
    $SK probe --model "$m" --out "$OUT"
  fi
  if [[ $what == ppl || $what == all ]]; then
    $SK eval ppl --model "$m" "${PPL[@]}" --budgets 0.25,0.3,0.4,0.5,0.75 --allocators paper \
      --methods full,pdtrim,spectrum-3tier,spectrum-3tier+had+g32
    $SK eval ppl --model "$m" "${PPL[@]}" --budgets 0.3,0.5 --allocators paper,optimal \
      --methods full,int8,int4,int4+had+g32,snapkv,spectrum-3tier,spectrum-2tier,spectrum-auto
  fi
  if [[ $what == niah || $what == all ]]; then
    $SK eval niah --model "$m" --context "${NIAH_CONTEXT:-4096}" --trials "${NIAH_TRIALS:-20}" \
      --budgets 0.3,0.5 --allocators paper \
      --methods full,int4,int4+had+g32,pdtrim,snapkv,spectrum-3tier,spectrum-3tier+had+g32,spectrum-2tier,spectrum-auto \
      --out "$OUT" --details "bench/results/niah_details_${m}_${NIAH_CONTEXT:-4096}.json"
  fi
done
if [[ $what == plots || $what == all ]]; then
  $SK eval plot --input "$OUT" --out-dir bench/results
  $SK eval report --input "$OUT" --out bench/results/quality.md >/dev/null
fi
