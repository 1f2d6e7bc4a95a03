#!/usr/bin/env bash
# The one command run on the GPU machine for the request path (issue 10): the GPU
# tests of the kernels and of transfer.pack_request / unpack_request, then
# bench/request_path.py, writing logs and results to $OUT.
#
# Needs: torch + triton + pytest (the GPU image has them), msgspec and flashinfer. The
# committed way to get them there (two commands):
#   here:       bash scripts/gpu_fetch.sh        (cp312 wheels -> parcels in .gpu/)
#   on device:  carry [".gpu/p1"], bash scripts/gpu_setup.sh .gpu/p1 && bash scripts/device_request_path.sh
# (gpu_setup.sh unpacks siteA: msgspec, flashinfer 0.6.15 and their dependencies, into
# /tmp/site). Wheels in .carry-rp/ or .whl/ are installed too when present.
# FlashInfer tests run only if flashinfer is importable.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spectrum_out}
mkdir -p "$OUT"
wheels=$(ls .carry-rp/*.whl .whl/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $wheels || exit 1
fi
source scripts/device_shim.sh  # sglang_spectrum.kernels -> the checkout's kernels/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton, msgspec; print('torch', torch.__version__, 'triton',
triton.__version__, 'msgspec', msgspec.__version__)" || exit 1
tests="tests/test_kernels.py tests/test_transfer.py"
python3 -c "import flashinfer" 2>/dev/null && tests="$tests tests/test_flashinfer_layout.py"

# the request path (16-bit and FP8 pools, head slices) and the per-channel kernels first,
# then the older kernel tests and the FlashInfer proofs (FP8 pools included), then the CUDA
# metadata rows
start=$(date +%s)
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -m gpu tests/test_transfer.py tests/test_kernels.py \
  tests/test_fp8_transfer.py tests/test_fp8_kernels.py tests/test_head_slices.py \
  -k "transfer or channel or gpu_request or fp8 or across_ranks or head_range" -v -s \
  -p no:cacheprovider > "$OUT/pytest.log" 2>&1
echo "pytest (request path, FP8, head slices, channel keys) rc=$? in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout ${TEST_TIMEOUT2:-150} python3 -m pytest -m gpu $tests \
  -k "not channel and not gpu_request and (not fp8 or unpacked_fp8_pools)" -v -s \
  -p no:cacheprovider >> "$OUT/pytest.log" 2>&1
echo "pytest (other GPU tests) rc=$? in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout 60 python3 -m pytest tests/test_sglang_plugin.py -k metadata_row -v -p no:cacheprovider \
  >> "$OUT/pytest.log" 2>&1
echo "pytest (metadata rows in device memory) rc=$? in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout 60 python3 -m pytest -m gpu tests/test_backend_state.py -k warm_up -v -p no:cacheprovider \
  >> "$OUT/pytest.log" 2>&1
echo "pytest (the decode's kernel warm-up under host staging) rc=$? in $(( $(date +%s) - start )) s"
grep -E "PASSED|FAILED|ERROR|GPU |Error|assert|passed|failed" "$OUT/pytest.log" \
  | cut -c1-200 | tail -45

[[ ${SKIP_BENCH:-0} == 1 ]] && exit 0  # the GPU tests alone
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-170} python3 bench/request_path.py --out "$OUT" ${BENCH_ARGS:-} \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - start )) s"
tail -60 "$OUT/bench.log"
