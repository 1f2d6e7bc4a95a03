#!/usr/bin/env bash
# Set up .venv/ (SGLang 0.5.23, idempotent) and run the test suite there; extra arguments
# go to pytest. Without arguments it then also sets up .venv-0.5.17/ and runs the
# plugin tests, one PD round trip and one fault test on SGLang 0.5.17
# (SPECTRUM_SKIP_0517=1 skips that part).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The repo's kernels/ folder must not shadow the `kernels` package SGLang imports:
# never put the working directory on sys.path (python -m / -c would).
export PYTHONSAFEPATH=1

run_pytest() {  # pytest's exit code 5 (nothing collected) is a failure here
  local venv="$1"
  shift
  set +e
  "$venv/bin/pytest" "$@"
  local rc=$?
  set -e
  if [[ $rc -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
    return 1
  fi
  return $rc
}

# A run needs about 9 GB (two venvs of 3.5 GB, the models, pip's temporary files).
free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
echo "[test] free disk: ${free_gb} GB"
if [[ "$free_gb" -lt 10 ]]; then
  echo "[test] warning: under 10 GB free; the two venvs may not fit (pip: 'No space left')" >&2
fi
bash scripts/bootstrap.sh
# Real models for the tests (downloaded once into ~/.cache/sglang_spectrum).
.venv/bin/spectrumkv models fetch smollm2-135m >/dev/null
full=0
[[ $# -eq 0 && "${SPECTRUM_SKIP_0517:-0}" != "1" ]] && full=1
# A run of the whole suite sets up, in the background beside its first (single-process)
# tests, the two other models (Gemma 3 first: test_eval needs it before test_hf_bridge
# needs Qwen; a test that needs one waits on ensure_model's lock; a failed fetch here only
# leaves it to that test) and, unless skipped, the SGLang 0.5.17 venv (mostly downloads
# and unpacking): a CI run gains ~2 of its ~30 minutes. A run of chosen tests fetches
# only what they ask for.
LOGS=$(mktemp -d)
if [[ $# -eq 0 ]]; then
  .venv/bin/spectrumkv models fetch gemma3-270m qwen2.5-coder-0.5b >"$LOGS/models.log" 2>&1 &
fi
boot_0517=""
if [[ $full -eq 1 ]]; then
  SPECTRUM_SGLANG=0.5.17 SPECTRUM_VENV=.venv-0.5.17 bash scripts/bootstrap.sh \
    >"$LOGS/bootstrap-0.5.17.log" 2>&1 &
  boot_0517=$!
fi
rc=0
run_pytest .venv "$@" || rc=$?
boot_rc=0
if [[ -n "$boot_0517" ]]; then
  wait "$boot_0517" || boot_rc=$?
fi
wait  # the model fetch, if any (its outcome is the tests')
[[ $rc -eq 0 ]] || exit $rc
if [[ $full -eq 1 ]]; then
  echo "[test] SGLang 0.5.17: plugin, one PD round trip, one fault test"
  if [[ $boot_rc -ne 0 ]]; then
    cat "$LOGS/bootstrap-0.5.17.log" >&2
    echo "[test] error: the SGLang 0.5.17 venv could not be set up (log above)" >&2
    exit 1
  fi
  cat "$LOGS/bootstrap-0.5.17.log"
  run_pytest .venv-0.5.17 -p no:cacheprovider \
    tests/test_sglang_plugin.py tests/test_pd_faults.py \
    -k "registered or options_parse or option_errors or unsupported or corrupt"
fi
