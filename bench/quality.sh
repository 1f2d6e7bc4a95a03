#!/usr/bin/env bash
# The quality evaluation behind bench/results/quality.{json,md} and the plots.
# Usage: bash bench/quality.sh [ppl|niah|probe|plots|all] [models...]
# CPU budget note: on a 2-core machine the full set takes hours; the settings below
# (4 windows of C=1024 + M=256; NIAH 20 trials) are what the committed results used.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what="${1:-all}"; shift || true
models=("${@:-smollm2-135m gemma3-270m qwen2.5-coder-0.5b}")
read -r -a models <<<"${models[*]}"
SK=.venv/bin/spectrumkv
OUT=bench/results/quality.json
BUDGETS=0.25,0.3,0.4,0.5,0.75
for m in "${models[@]}"; do
  if [[ $what == probe || $what == all ]]; then
    $SK probe --model "$m" --out "$OUT"
  fi
  if [[ $what == ppl || $what == all ]]; then
    $SK eval ppl --model "$m" --windows 4 --context 1024 --continuation 256 --budgets $BUDGETS \
      --methods spectrum-3tier,spectrum-3tier+had+g32 --allocators paper,optimal --out "$OUT"
    $SK eval ppl --model "$m" --windows 4 --context 1024 --continuation 256 --budgets $BUDGETS \
      --methods full,int8,int4,int4+had+g32,pdtrim,snapkv,spectrum-2tier,spectrum-auto \
      --allocators paper --out "$OUT"
  fi
  if [[ $what == niah || $what == all ]]; then
    $SK eval niah --model "$m" --context "${NIAH_CONTEXT:-4096}" --trials "${NIAH_TRIALS:-20}" \
      --budgets 0.3,0.5 --allocators paper \
      --methods full,int4,int4+had+g32,pdtrim,snapkv,spectrum-3tier,spectrum-3tier+had+g32,spectrum-2tier,spectrum-auto \
      --out "$OUT" --details "bench/results/niah_details_${m}.json"
  fi
done
if [[ $what == plots || $what == all ]]; then
  $SK eval plot --input "$OUT" --out-dir bench/results
  $SK eval report --input "$OUT" --out bench/results/quality.md >/dev/null
fi
