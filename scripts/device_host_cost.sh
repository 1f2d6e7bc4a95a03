#!/usr/bin/env bash
# A later layer-group part's host cost (issue 17 item 5) on the GPU machine, in one call:
# the GPU tests of the request path ($TESTS, default none), the host time of each of a
# later part's steps alone (bench/part_cost.py --breakdown), then bench/part_cost.py with
# the checkout's code and with $OLD_SRC's (sglang_spectrum/ and kernels/ of an older
# commit: the files scripts/old_src.sh writes) in turns, new-old-new-old ($TURNS): the host's
# speed moves between calls and within one. Where the card is an H200, also the request
# path timed queued ($RP=1 forces it anywhere); NCU=1: the FP8 pools' INT4 channel pack
# under ncu. Logs and a tarball of the results go to $OUT.
#
#   carry [".gpu/s1", ".gpu/old_src"]:
#   bash scripts/gpu_setup.sh .gpu/s1 > $OUT/setup.log 2>&1; bash scripts/device_host_cost.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spectrum_out}
OLD_SRC=${OLD_SRC:-.gpu/old_src}
mkdir -p "$OUT/hc"
LOG="$OUT/host_cost.log"
source scripts/device_step.sh  # step NAME CMD...
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$LOG"
source scripts/device_shim.sh
if [[ -n ${TESTS-} ]]; then
  read -r -a tests <<< "$TESTS"
  step pytest_gpu python3 -m pytest -m gpu -p no:cacheprovider -q "${tests[@]}"
fi
step breakdown python3 bench/part_cost.py --tokens 16 --iters 20 --breakdown --out "$OUT/hc/new"
# the older commit's tree: the checkout's sglang_spectrum/ and kernels/ with $OLD_SRC's
# files (those that differ, scripts/old_src.sh) laid over them
rm -rf /tmp/old_tree && mkdir -p /tmp/old_tree && cp -r sglang_spectrum kernels /tmp/old_tree/
[[ -d $OLD_SRC ]] && cp -r "$OLD_SRC"/. /tmp/old_tree/
for turn in ${TURNS-new1 old1 new2 old2}; do
  src=.
  [[ $turn == old* ]] && src=/tmp/old_tree
  [[ $turn == old* && ! -f $OLD_SRC/COMMIT ]] && { echo "[$turn: no $OLD_SRC]" >> "$LOG"; continue; }
  SHIM_SRC=$src source scripts/device_shim.sh
  step "part_cost_$turn" python3 bench/part_cost.py --tokens 16 2048 8192 --iters 20 \
    --out "$OUT/hc/$turn"
done
source scripts/device_shim.sh
if [[ ${RP-} == 1 ]] || grep -q H200 "$LOG"; then
  step request_path python3 bench/request_path.py --tokens 4096 8192 16384 --budgets 0.3 0.5 \
    --key-scales channel --pools bf16 --iters 10 --out "$OUT/hc/rp"
fi
if [[ ${NCU-} == 1 ]] && command -v ncu > /dev/null; then  # FP8 pools' INT4 channel pack
  step ncu_fp8_channel timeout 120 ncu --kernel-name _pack_channel_kernel --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    python3 bench/request_path.py --tokens 16384 --budgets 0.3 --key-scales channel \
    --pools fp8_e4m3 --iters 1 --warmup 0 --out "$OUT/hc/ncu"
fi
tar -C "$OUT" -czf "$OUT/hc.tgz" hc && rm -rf "$OUT/hc"
grep -E "^\[|passed|failed" "$LOG"
