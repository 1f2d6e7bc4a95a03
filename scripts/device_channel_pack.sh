#!/usr/bin/env bash
# Issue 17 item 5 on the GPU machine in one call (bench/README "Next GPU lease", item 5):
# the per-channel key pack's shapes of the fourteenth and fifteenth sessions (`fill_rows`,
# `channel_group`, `words`, `load_bytes`) on CUDA: their bytes against the default's and the
# reference's (GPU tests), their times against the default and a copy
# (bench/channel_kernel.py), a later layer-group part's host cost and device wait
# (bench/part_cost.py), then ncu on the default and on the shape with the fewest SASS
# instructions an element under both Triton versions (38).
# Logs and results go to $OUT (6 files).
#
#   carry [".gpu/s1"]:
#   bash scripts/gpu_setup.sh .gpu/s1 > $OUT/setup.log 2>&1; bash scripts/device_channel_pack.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spectrum_out}
mkdir -p "$OUT"
LOG="$OUT/channel_pack.log"
source scripts/device_shim.sh  # sglang_spectrum.kernels -> the checkout's kernels/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$LOG"
python3 -m pytest -p no:cacheprovider -q tests/test_kernels.py tests/test_kernels_compile.py \
  -k "channel or words or signed_zeros" >> "$LOG" 2>&1
echo "[pytest rc=$?]" >> "$LOG"
python3 bench/channel_kernel.py --select 17 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 \
  --tokens 16384 4096 --budgets 0.3 --out "$OUT" >> "$LOG" 2>&1
echo "[channel_kernel rc=$?]" >> "$LOG"
python3 bench/part_cost.py --out "$OUT" >> "$LOG" 2>&1
echo "[part_cost rc=$?]" >> "$LOG"
if command -v ncu > /dev/null; then
  for shape in 17 38; do
    timeout 120 ncu --kernel-name _pack_channel_kernel --launch-count 1 --section SpeedOfLight \
      --section Occupancy --section SchedulerStats --section WarpStateStats \
      python3 bench/channel_kernel.py --tokens 16384 --budgets 0.3 --select "$shape" --iters 1 \
      --out "/tmp/ncu_$shape" >> "$OUT/channel_pack_ncu.log" 2>&1
  done
fi
