#!/usr/bin/env bash
# After a change of the channel pack's default launch shape (kernels/channel.py): on the
# GPU machine, the GPU tests of every kernel and of the request path (the bytes of the
# new default against the reference), the launch-shape tests, then bench/request_path.py
# and bench/part_cost.py with the new default and with the one of commit $OLD (default:
# the parent of the commit that changed it) in turns, new-old-new-old: the request's whole
# path (plan, copies, synchronisation) and a later part's host cost compared in one run,
# not only the kernel (the host's speed moved between calls of one warm machine). Logs
# and a tarball of the results go to $OUT.
#
#   carry [".gpu/s1"]:
#   bash scripts/gpu_setup.sh .gpu/s1 > $OUT/setup.log 2>&1; bash scripts/device_default_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spectrum_out}
OLD=${OLD:-$(git log -1 --format=%H -G "^DEFAULT_TUNING" -- kernels/channel.py 2>/dev/null)~1}
mkdir -p "$OUT/rp"
LOG="$OUT/default_check.log"
source scripts/device_shim.sh  # sglang_spectrum.kernels -> the checkout's kernels/
source scripts/device_step.sh  # step NAME CMD...
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$LOG"
read -r -a TESTS <<< "${TESTS:-tests/test_kernels.py tests/test_fp8_kernels.py tests/test_transfer.py tests/test_fp8_transfer.py}"
step pytest_gpu python3 -m pytest -m gpu -p no:cacheprovider -q "${TESTS[@]}"
step pytest_shapes python3 -m pytest -p no:cacheprovider -q tests/test_kernels.py \
  -k "channel_launch_shapes or clamped_path"
cp kernels/channel.py /tmp/channel_new.py
# The device's copy of the checkout has no .git: then OLD_FILE, the committed copy of the
# old channel.py (the one before s17's default by default).
OLD_FILE=${OLD_FILE:-bench/results/gpu_calls/2026-12-06-s17/call1_channel_pack/channel_before.py.txt}
git show "$OLD:kernels/channel.py" > /tmp/channel_old.py 2>/dev/null \
  || cp "$OLD_FILE" /tmp/channel_old.py || exit 1
for turn in ${TURNS-new1 old1 new2 old2}; do  # TURNS: fewer (or "") where the call has less time
  cp "/tmp/channel_${turn%?}.py" kernels/channel.py
  step "request_path_$turn" python3 bench/request_path.py --tokens 4096 8192 16384 \
    --budgets 0.3 0.5 --key-scales channel --pools bf16 --iters 10 --out "$OUT/rp/$turn"
  step "part_cost_$turn" python3 bench/part_cost.py --tokens 16 2048 8192 --iters 20 \
    --out "$OUT/rp/$turn"
done
cp /tmp/channel_new.py kernels/channel.py
tar -C "$OUT" -czf "$OUT/rp.tgz" rp && rm -rf "$OUT/rp"
grep -E "^\[|passed|failed" "$LOG"
