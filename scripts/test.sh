#!/usr/bin/env bash
# Set up .venv/ (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
# Real models for the tests (downloaded once into ~/.cache/sglang_spectrum).
.venv/bin/spectrumkv models fetch smollm2-135m >/dev/null
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc
