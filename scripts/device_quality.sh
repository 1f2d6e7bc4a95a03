#!/usr/bin/env bash
# One call of the GPU quality run (bench/README.md "Quality on the GPU"):
#   bash scripts/device_quality.sh CALL [build MODEL]... [eval MODEL SECONDS]...
# CALL (e.g. call03) names the slice of .carry/q/ this call carries (see
# scripts/device_models.py); the first call also carries .carry/whlq (msgspec,
# gguf; cp312) and .carry/wikitext. State lives in /tmp on the device, which
# survives between calls only while the machine is held; results in /tmp/qres
# come back as $OUT/qres.tgz after every call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spectrum_out}
mkdir -p "$OUT" /tmp/stage /tmp/qres
if [[ ! -d /tmp/site/msgspec ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .carry/whlq/*.whl || exit 1
fi
[[ -f .carry/wikitext/wiki.test.raw.gz ]] && gzip -dc .carry/wikitext/wiki.test.raw.gz > /tmp/stage/wiki.test.raw
source scripts/device_shim.sh  # sglang_spectrum.kernels -> the checkout's kernels/
export SPECTRUM_CACHE_DIR=/tmp/spc SPECTRUM_WIKITEXT=/tmp/stage/wiki.test.raw
python3 scripts/device_models.py take ".carry/q/$1" || exit 1
shift
rc=0
while [[ $# -gt 0 ]]; do
  case $1 in
    build) python3 scripts/device_models.py build "$2" 2>&1 | grep -v "it/s\]" || rc=1; shift 2 ;;
    eval) python3 bench/quality_gpu.py --model "$2" --out-dir /tmp/qres --deadline "$3" \
            ${QUALITY_ARGS:-} || rc=1; shift 3 ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
done
tar czf "$OUT/qres.tgz" -C /tmp qres
exit $rc
