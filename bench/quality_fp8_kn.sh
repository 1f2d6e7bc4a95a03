#!/usr/bin/env bash
# FP8 KV-cache baselines (issue 16) and the first-layer-group tier map (issue 17, +knG)
# on the three stand-in models, CPU, one process at a time:
#   ppl  C=2048 + M=256, PPL_WINDOWS windows (default 32), b=0.3/0.5
#   NIAH 4096 tokens (Gemma 3: 1024, the longest it retrieves at in full precision: 85 %,
#   35 % at 4096), NIAH_TRIALS trials (default 20), b=0.3/0.5
# Results: bench/results/cpu/<model>__{ppl_2048,niah_4096}_fp8_kn.json (+ NIAH details);
# then `python bench/merge_results.py bench/results/gpu/*.json bench/results/cpu/*.json`.
#   pool: ppl as above of the serving default packed from an FP8 e4m3 pool (+fp8, issue 16's
#         FP8-pool target) beside full and fp8_e4m3 -> <model>__ppl_2048_fp8pool.json, and
#         its NIAH 4096 at b=0.3 (not Gemma 3) -> <model>__niah_4096_fp8pool.json
# Usage: bash bench/quality_fp8_kn.sh [ppl|niah|pool|all] [models...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SK=${SK:-.venv/bin/spectrumkv}
R=bench/results/cpu
what="${1:-all}"; shift || true
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(smollm2-135m qwen2.5-coder-0.5b gemma3-270m)
KN=spectrum-auto+kc+kn  # the serving default: channel keys, key-norm scores
layer_groups() {  # G values per model (layers: SmolLM2 30, Qwen2.5 24, Gemma 3 18)
  case $1 in
    gemma3-270m) echo "1 4 8 12 18" ;;  # 18 = all layers over full keys (as SGLang's pool)
    *) echo "1 4 8 16" ;;
  esac
}
niah_context() { [[ $1 == gemma3-270m ]] && echo 1024 || echo 4096; }
kn_methods() { local m=$KN g; for g in $(layer_groups "$1"); do m+=",$KN$g"; done; echo "$m"; }
for m in "${models[@]}"; do
  if [[ $what == ppl || $what == all ]]; then
    $SK eval ppl --model "$m" --device cpu --context 2048 --continuation 256 \
      --windows "${PPL_WINDOWS:-32}" --budgets 0.3,0.5 --allocators paper \
      --methods "full,fp8_e4m3,fp8_e5m2,pdtrim,spectrum-auto+kc,$(kn_methods "$m")" \
      --out "$R/${m}__ppl_2048_fp8_kn.json"
    rm -f "$R/${m}__ppl_2048_fp8_kn.md"
  fi
done
for m in "${models[@]}"; do
  if [[ $what == niah || $what == all ]]; then
    c=$(niah_context "$m")
    $SK eval niah --model "$m" --device cpu --context "$c" --trials "${NIAH_TRIALS:-20}" \
      --budgets 0.3,0.5 --allocators paper --methods "full,fp8_e4m3,$(kn_methods "$m")" \
      --out "$R/${m}__niah_${c}_fp8_kn.json" --details "$R/${m}__niah_${c}_fp8_kn_details.json"
    rm -f "$R/${m}__niah_${c}_fp8_kn.md"
  fi
done
for m in "${models[@]}"; do
  if [[ $what == pool ]]; then
    $SK eval ppl --model "$m" --device cpu --context 2048 --continuation 256 \
      --windows "${PPL_WINDOWS:-32}" --budgets 0.3,0.5 --allocators paper \
      --methods "full,fp8_e4m3,$KN+fp8" --out "$R/${m}__ppl_2048_fp8pool.json"
    rm -f "$R/${m}__ppl_2048_fp8pool.md"
    if [[ $m != gemma3-270m ]]; then  # (Gemma 3 retrieves 35 % at 4096 in full precision)
      $SK eval niah --model "$m" --device cpu --context 4096 --trials "${NIAH_TRIALS:-20}" \
        --budgets 0.3 --allocators paper --methods "full,$KN+fp8" \
        --out "$R/${m}__niah_4096_fp8pool.json" --details "$R/${m}__niah_4096_fp8pool_details.json"
      rm -f "$R/${m}__niah_4096_fp8pool.md"
    fi
  fi
done
