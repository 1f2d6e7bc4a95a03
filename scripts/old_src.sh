#!/usr/bin/env bash
# Write sglang_spectrum/ and kernels/ of commit $1 (default HEAD) into .gpu/old_src, for
# a device call that compares the working tree against that commit in turns
# (scripts/device_host_cost.sh; carry ".gpu/old_src").
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu/old_src && mkdir -p .gpu/old_src
# the Python files only: the eval data stays out (the call's 64 MiB)
git archive "${1:-HEAD}" sglang_spectrum kernels | tar -x -C .gpu/old_src --wildcards '*.py'
git rev-parse "${1:-HEAD}" > .gpu/old_src/COMMIT
