#!/usr/bin/env bash
# Set up .venv/ (idempotent) and run the main job on the embedded default model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec .venv/bin/spectrumkv demo "$@"
