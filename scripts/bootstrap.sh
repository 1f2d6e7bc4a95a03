#!/usr/bin/env bash
# Create (or refresh) the project virtual environment at .venv/ on a CPU machine.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.spectrum-bootstrap"
want_stamp="$(cat requirements-cpu.txt constraints-cpu.txt pyproject.toml setup.py sglang_spectrum/sglang_plugin/*.pth scripts/bootstrap.sh patches/*.patch 2>/dev/null | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
  exit 0
fi

# Mooncake's non-CUDA build links against the RDMA verbs and NUMA libraries.
if ! ldconfig -p | grep -q librdmacm.so.1 || ! ldconfig -p | grep -q libnuma.so.1; then
  echo "[bootstrap] installing apt packages: libibverbs1 librdmacm1 libnuma1"
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libibverbs1 librdmacm1 libnuma1 >/dev/null
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_install() {
  # The machine's pip config lists local indexes; hide their "is ignored" noise.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints-cpu.txt "$@" \
    2> >(grep -v -e "is ignored: it is neither a file nor a directory" \
                 -e "^sglang 0.5.10.post1 requires" -e "dependency resolver does not" >&2)
}
echo "[bootstrap] installing torch (CPU) ..."
pip_install torch==2.13.0
# pip then reports sglang's unmet CUDA pins (torch==2.9.1, sglang-kernel, ...): expected, hidden.
echo "[bootstrap] installing sglang 0.5.10.post1 (no deps; CUDA-only deps left out) ..."
pip_install --no-deps sglang==0.5.10.post1
echo "[bootstrap] installing runtime and test dependencies ..."
pip_install -r requirements-cpu.txt
echo "[bootstrap] installing sglang-spectrum (editable) ..."
pip_install --no-deps -e .
echo "[bootstrap] applying CPU import guards to the installed sglang ..."
"$VENV/bin/python" -m sglang_spectrum.patching apply
echo "$want_stamp" > "$STAMP"
echo "[bootstrap] ready: $VENV"
