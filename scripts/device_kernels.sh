#!/usr/bin/env bash
# The one command run on the GPU machine for the pack/unpack kernels:
# install the carried wheels, run the GPU tests (incl. the FlashInfer layout
# proof) and the kernel benchmark, writing logs and results to $OUT.
#
# Carry: .whl (flashinfer-python, apache-tvm-ffi, cuda-tile, nvidia-cudnn-frontend,
# msgspec; cp312) and .carry/staging_buffer.py (SGLang's staging kernels, copied
# from the sglang wheel; Apache-2.0, not committed). Usage on the device:
#   bash scripts/device_kernels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spectrum_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
source scripts/device_shim.sh  # sglang_spectrum.kernels -> the checkout's kernels/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton, flashinfer; print('torch', torch.__version__, 'triton',
triton.__version__, 'flashinfer', flashinfer.__version__)"

start=$(date +%s)
timeout 320 python3 -m pytest -m gpu tests/test_kernels.py tests/test_flashinfer_layout.py \
  -v -s -p no:cacheprovider --timeout 300 > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
grep -E "PASSED|FAILED|ERROR|GPU |flashinfer page|score ranks|Error|assert" "$OUT/pytest.log" \
  | cut -c1-220 | tail -60
tail -3 "$OUT/pytest.log"

start=$(date +%s)
timeout 230 python3 bench/kernels.py --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - start )) s"
grep -vE '^\{' "$OUT/bench.log" | tail -70

echo "compiled pack/unpack PTX (16-byte global accesses, add.rz rounding, IEEE div, FMAs):"
for f in $(grep -l -E "\.entry _(pack|unpack)_kernel" ~/.triton/cache/*/*.ptx 2>/dev/null | head -8); do
  echo "$(grep -oE '\.entry _[a-z]+_kernel' "$f") ld.v4=$(grep -c 'ld.global.v4' "$f")" \
    "st.v4=$(grep -c 'st.global.v4' "$f") add.rz=$(grep -c 'add.rz' "$f")" \
    "div.rn=$(grep -c 'div.rn.f32' "$f") fma=$(grep -c 'fma.rn.f32' "$f")"
done
