#!/usr/bin/env bash
# On the GPU machine, after `bash scripts/gpu_setup.sh .gpu/p1` (msgspec, flashinfer):
# run one bench/ script of the request path against this checkout, e.g.
#   bash scripts/device_bench.sh bench/interference.py --out $OUT
#   bash scripts/device_bench.sh bench/channel_kernel.py --out $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_shim.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
exec python3 "$@"
