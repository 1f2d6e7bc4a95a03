#!/usr/bin/env bash
# Write the files of sglang_spectrum/ and kernels/ that differ between commit $1 (default
# HEAD) and the working tree into .gpu/old_src, for a device call that compares the two in
# turns (scripts/device_host_cost.sh lays them over a copy of the checkout's; carry
# ".gpu/old_src"). Only the changed files travel: the call carries 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse "${1:-HEAD}")
rm -rf .gpu/old_src && mkdir -p .gpu/old_src
for f in $(git diff --name-only "$commit" -- sglang_spectrum kernels); do
  mkdir -p ".gpu/old_src/$(dirname "$f")"
  git show "$commit:$f" > ".gpu/old_src/$f" 2>/dev/null || rm -f ".gpu/old_src/$f"
done
echo "$commit" > .gpu/old_src/COMMIT
