#!/usr/bin/env bash
# The parcels of scripts/gpu_fetch.sh without the SmolLM2 GGUF slices, for device calls
# that need only the Python packages (the 8B-shaped speed phase, bench/ scripts of the
# request path): .gpu/s1 = siteA (msgspec, flashinfer, ...), .gpu/s2 = siteB + mooncake +
# our wheel. Hard links, no copies; leaves room for a larger checkout in the 64 MiB a call
# carries. Device: carry [".gpu/s1"], `bash scripts/gpu_setup.sh .gpu/s1`, then .gpu/s2.
set -euo pipefail
cd "$(dirname "$0")/.."
for n in 1 2; do rm -rf ".gpu/s$n" && mkdir -p ".gpu/s$n"; done
ln .gpu/p1/siteA.tar.xz .gpu/s1/
ln .gpu/p2/siteB.tar.xz .gpu/p2/mooncake.tar.xz .gpu/p2/sglang_spectrum-*.whl .gpu/s2/
du -sh .gpu/s1 .gpu/s2
