#!/usr/bin/env bash
# Create (or refresh) a project virtual environment on a CPU machine.
# Idempotent: a second run with the same inputs only checks a stamp and exits.
#
#   bash scripts/bootstrap.sh                                         # .venv/, SGLang 0.5.23
#   SPECTRUM_SGLANG=0.5.17 SPECTRUM_VENV=.venv-0.5.17 bash scripts/bootstrap.sh
#
# Environment variables:
#   SPECTRUM_SGLANG  SGLang version to install (default 0.5.23). Supported: the
#                    versions with a constraints-cpu-<version>.txt (0.5.23, 0.5.17).
#   SPECTRUM_VENV    venv directory, relative to the repo root or absolute
#                    (default .venv). Use a separate venv per SGLang version.
#   PYTHON           interpreter that creates the venv (default python3).
#
# What it installs: CPU torch (torch==2.13.0, pinned: an unpinned torch pulls a
# multi-GB CUDA build), SGLang with --no-deps (its metadata pins CUDA torch and
# CUDA kernel wheels), the CPU packages SGLang really needs (requirements-cpu.txt
# plus requirements-cpu-<version>.txt if present, pinned by constraints-cpu.txt and
# constraints-cpu-<version>.txt), this project editable, and the runtime patches of
# patches/ meant for that SGLang version (`python -m sglang_spectrum.patching apply`).
# apt: libibverbs1 librdmacm1 libnuma1 (mooncake-transfer-engine-non-cuda needs them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SGLANG_VERSION="${SPECTRUM_SGLANG:-0.5.23}"
VENV="${SPECTRUM_VENV:-.venv}"
[[ "$VENV" = /* ]] || VENV="$ROOT/$VENV"
PY="${PYTHON:-python3}"
STAMP="$VENV/.spectrum-bootstrap"
VER_CONSTRAINTS="constraints-cpu-$SGLANG_VERSION.txt"
VER_REQUIREMENTS="requirements-cpu-$SGLANG_VERSION.txt"
if [[ ! -f "$VER_CONSTRAINTS" ]]; then
  echo "[bootstrap] unsupported SGLang version '$SGLANG_VERSION' (no $VER_CONSTRAINTS);" \
       "supported: $(ls constraints-cpu-*.txt | sed 's/constraints-cpu-\(.*\)\.txt/\1/' | tr '\n' ' ')" >&2
  exit 2
fi
want_stamp="$( (echo "$SGLANG_VERSION"; cat requirements-cpu*.txt constraints-cpu*.txt pyproject.toml setup.py \
  sglang_spectrum/sglang_plugin/*.pth scripts/bootstrap.sh patches/*.patch 2>/dev/null || true) \
  | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
  exit 0
fi

# Mooncake's non-CUDA build links against the RDMA verbs and NUMA libraries.
if ! ldconfig -p | grep -q libibverbs.so.1 || ! ldconfig -p | grep -q librdmacm.so.1 \
   || ! ldconfig -p | grep -q libnuma.so.1; then
  echo "[bootstrap] installing apt packages: libibverbs1 librdmacm1 libnuma1"
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libibverbs1 librdmacm1 libnuma1 >/dev/null
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_install() {
  # The machine's pip config lists local indexes; hide their "is ignored" noise, and
  # SGLang's unmet CUDA pins (torch==2.x, sglang-kernel, flashinfer, ...): expected.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -c constraints-cpu.txt -c "$VER_CONSTRAINTS" "$@" \
    2> >(grep -v -e "is ignored: it is neither a file nor a directory" \
                 -e "^sglang [0-9.a-z]* requires" -e "dependency resolver does not" >&2)
}
echo "[bootstrap] $VENV: installing torch (CPU) ..."
pip_install torch==2.13.0
# An older SGLang in this venv (e.g. 0.5.10.post1) may leave files behind: replace it.
have_sglang="$("$VENV/bin/python" -m pip show sglang 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [[ "$have_sglang" != "$SGLANG_VERSION" ]]; then
  echo "[bootstrap] installing sglang $SGLANG_VERSION (no deps; CUDA-only deps left out) ..."
  "$VENV/bin/python" -m pip uninstall -q -y sglang >/dev/null 2>&1 || true
  pip_install --no-deps "sglang==$SGLANG_VERSION"
fi
echo "[bootstrap] installing runtime and test dependencies ..."
reqs=(-r requirements-cpu.txt)
[[ -f "$VER_REQUIREMENTS" ]] && reqs+=(-r "$VER_REQUIREMENTS")
pip_install "${reqs[@]}"
echo "[bootstrap] installing sglang-spectrum (editable) ..."
pip_install --no-deps -e .
echo "[bootstrap] applying CPU import guards to the installed sglang ..."
"$VENV/bin/python" -m sglang_spectrum.patching apply
echo "$want_stamp" > "$STAMP"
echo "[bootstrap] ready: $VENV (sglang $SGLANG_VERSION)"
