#!/usr/bin/env bash
# Issue 17 item 5 on the GPU machine in one call (bench/README "Next GPU lease", item 5):
# the GPU tests of every kernel (the fifteenth session changed the main pack's bf16 path);
# the per-channel key pack's shapes of the fourteenth and fifteenth sessions (`fill_rows`,
# `channel_group`, `words`, `load_bytes`) on CUDA: their bytes against the default's and the
# reference's (GPU tests), their times against the default and a copy
# (bench/channel_kernel.py); the fastest shape that qualifies becomes the default of this
# copy of the checkout (bench/pick_channel_default.py rewrites kernels/channel.py here
# only), whose bytes the GPU tests check again and whose request path
# bench/request_path.py times against a copy (the 0.6-of-copy target); a later
# layer-group part's host cost and device wait (bench/part_cost.py); then, while the
# call's time lasts, the request path with the old default in the same run and ncu on
# the default and on shape 38. Logs and results go to $OUT.
#
#   carry [".gpu/s1"]:
#   bash scripts/gpu_setup.sh .gpu/s1 > $OUT/setup.log 2>&1; bash scripts/device_channel_pack.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spectrum_out}
DEADLINE_S=${DEADLINE_S:-540}  # the call's 600 s, less the setup and the transfers
mkdir -p "$OUT"
LOG="$OUT/channel_pack.log"
source scripts/device_shim.sh  # sglang_spectrum.kernels -> the checkout's kernels/
source scripts/device_step.sh  # step NAME CMD...
REQUEST_PATH=(python3 bench/request_path.py --tokens 4096 16384 --budgets 0.3 0.5
  --key-scales channel --pools bf16 --iters 10)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$LOG"
# every GPU test of the kernels and the request path (s15 changed the main pack's words
# path), then the launch shapes' bytes on CUDA
step pytest_gpu python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_kernels.py \
  tests/test_fp8_kernels.py tests/test_transfer.py
step pytest_shapes python3 -m pytest -p no:cacheprovider -q tests/test_kernels.py \
  -k "channel_launch_shapes or clamped_path"
# SHAPES: a shorter sweep where the call has less time; the default shape (the index of
# kernels.channel.DEFAULT_TUNING in bench/channel_kernel.py's SHAPES) is always timed, as
# the pick compares every candidate with it in the same run
DEFAULT_SHAPE=$(python3 -c "import sys; sys.path.insert(0, 'bench')
import channel_kernel; print(channel_kernel.default_index())") || exit 1
read -r -a SHAPES <<< "${SHAPES:-17 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41}"
[[ " ${SHAPES[*]} " == *" $DEFAULT_SHAPE "* ]] || SHAPES=("$DEFAULT_SHAPE" "${SHAPES[@]}")
step channel_kernel python3 bench/channel_kernel.py --select "${SHAPES[@]}" \
  --tokens 16384 4096 --budgets 0.3 --out "$OUT"
cp kernels/channel.py "$OUT/channel_before.py.txt"
step pick python3 bench/pick_channel_default.py "$OUT/channel_kernel.json" --out "$OUT" \
  --write kernels/channel.py
if grep -q '"changed": true' "$OUT/channel_default.json" 2> /dev/null; then
  step pytest_new_default python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_kernels.py \
    tests/test_transfer.py -k "channel or request_path or byte_identical"
  step request_path_new_default "${REQUEST_PATH[@]}" --out "$OUT/new_default"
fi
step part_cost python3 bench/part_cost.py --out "$OUT"
if ((SECONDS < DEADLINE_S - 120)); then
  cp "$OUT/channel_before.py.txt" kernels/channel.py  # the committed default, same run
  step request_path_old_default "${REQUEST_PATH[@]}" --out "$OUT/old_default"
fi
if command -v ncu > /dev/null; then
  for shape in "$DEFAULT_SHAPE" 17; do  # the default and the one before it
    ((SECONDS < DEADLINE_S - 100)) || break
    timeout 90 ncu --kernel-name _pack_channel_kernel --launch-count 1 --section SpeedOfLight \
      --section Occupancy --section SchedulerStats --section WarpStateStats \
      python3 bench/channel_kernel.py --tokens 16384 --budgets 0.3 --select "$shape" --iters 1 \
      --out "/tmp/ncu_$shape" >> "$OUT/channel_pack_ncu.log" 2>&1
  done
fi
echo "[done in $SECONDS s]" >> "$LOG"
