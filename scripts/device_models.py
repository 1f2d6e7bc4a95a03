"""Ship the stand-in models to the GPU machine, which reaches no package index.

The device tool carries at most 64 MiB per call and keeps a machine only while
calls follow each other, so a model travels as its GGUF (the smallest exact
form of its weights) cut into pieces, one call each, plus the small files of
the locally converted folder (config, tokenizer) and the SHA-256 of every
tensor of the local safetensors. On the device the pieces are joined, the GGUF
checked, dequantised with transformers and saved into the model cache; the
result must match the local tensors bit for bit, else nothing is published.

    python scripts/device_models.py stage MODEL...   # here: .carry/q/callNN/ slices
    python scripts/device_models.py take DIR         # there: a slice -> /tmp/stage
    python scripts/device_models.py build MODEL...   # there: -> $SPECTRUM_CACHE_DIR/models
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

STAGE_OUT = Path(".carry/q")
DEVICE_STAGE = Path("/tmp/stage")
CALL_BYTES = 61 << 20  # per call, beside the ~2 MiB working tree and wheels
META_SKIP = {"model.safetensors", ".spectrum_complete.json"}


def tensor_digests(path: Path) -> dict[str, str]:
    """SHA-256 of every tensor's raw bytes in a safetensors file."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            raw = f.get_tensor(name).contiguous().view(-1).view(torch.uint8)
            out[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


def stage(names: list[str]) -> None:
    """Lay the models' files end to end and cut that stream into call-sized
    slices: .carry/q/callNN/{slice.bin,index.json}."""
    from sglang_spectrum.models import MODEL_SPECS, ensure_gguf, ensure_model

    shutil.rmtree(STAGE_OUT, ignore_errors=True)
    meta_root = Path(".carry/meta")
    shutil.rmtree(meta_root, ignore_errors=True)
    files: list[tuple[str, Path]] = []
    for name in names:
        folder = ensure_model(name, progress=False)
        meta = meta_root / name
        meta.mkdir(parents=True)
        for f in folder.iterdir():
            if f.name not in META_SKIP:
                with open(f, "rb") as src, gzip.open(meta / (f.name + ".gz"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        manifest = {
            "gguf": MODEL_SPECS[name].gguf_name,
            "gguf_sha256": MODEL_SPECS[name].sha256,
            "tensors": tensor_digests(folder / "model.safetensors"),
        }
        (meta / "manifest.json").write_text(json.dumps(manifest))
        files += [(f"{name}/{f.name}", f) for f in sorted(meta.iterdir())]
        files.append((f"{name}/gguf", ensure_gguf(name, progress=False)))
    index, offset = {}, 0
    for key, f in files:
        index[key] = [offset, f.stat().st_size]
        offset += f.stat().st_size
    calls = (offset + CALL_BYTES - 1) // CALL_BYTES
    for c in range(calls):
        d = STAGE_OUT / f"call{c:02d}"
        d.mkdir(parents=True)
        lo, hi = c * CALL_BYTES, min(offset, (c + 1) * CALL_BYTES)
        with open(d / "slice.bin", "wb") as out:
            for key, f in files:
                a, n = index[key]
                if a < hi and a + n > lo:
                    with open(f, "rb") as fh:
                        fh.seek(max(lo, a) - a)
                        out.write(fh.read(min(hi, a + n) - max(lo, a)))
        complete = [
            k.split("/")[0]
            for k, (a, n) in index.items()
            if k.endswith("/gguf") and lo < a + n <= hi
        ]
        (d / "index.json").write_text(json.dumps({"slice": [lo, hi], "files": index}))
        print(f"{d}: bytes {lo}..{hi}; completes {complete}")


def take(src: Path) -> None:
    """Write a call's slice into /tmp/stage/stream.bin at its offset."""
    info = json.loads((src / "index.json").read_text())
    DEVICE_STAGE.mkdir(parents=True, exist_ok=True)
    stream = DEVICE_STAGE / "stream.bin"
    with open(stream, "r+b" if stream.exists() else "wb") as out:
        out.seek(info["slice"][0])
        out.write((src / "slice.bin").read_bytes())
    have = (
        json.loads((DEVICE_STAGE / "have.json").read_text())
        if (DEVICE_STAGE / "have.json").exists()
        else []
    )
    have.append(info["slice"])
    (DEVICE_STAGE / "have.json").write_text(json.dumps(have))
    (DEVICE_STAGE / "index.json").write_text(json.dumps(info["files"]))
    print(f"stage holds {sum(b - a for a, b in have) / 2**20:.1f} MiB in {len(have)} slices")


def _read(key: str) -> bytes:
    offset, size = json.loads((DEVICE_STAGE / "index.json").read_text())[key]
    with open(DEVICE_STAGE / "stream.bin", "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise SystemExit(f"{key}: slices missing")
    return data


def build(name: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from sglang_spectrum.models import MARKER_FILE, MODEL_SPECS, cache_root

    t0 = time.time()
    manifest = json.loads(_read(f"{name}/manifest.json"))
    work = Path("/tmp/gguf") / name
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / manifest["gguf"]
    gguf.write_bytes(_read(f"{name}/gguf"))
    if hashlib.sha256(gguf.read_bytes()).hexdigest() != manifest["gguf_sha256"]:
        raise SystemExit(f"{name}: GGUF SHA-256 mismatch (a slice is missing or damaged)")
    model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
    final = cache_root() / "models" / name
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    # transformers refuses save_pretrained on a GGUF-loaded model: save the local
    # folder's tensor names ourselves (clones, so tied weights are written once each).
    state = model.state_dict()
    missing = sorted(set(manifest["tensors"]) - set(state))
    if missing:
        raise SystemExit(f"{name}: tensors of the local model not in the GGUF model: {missing[:5]}")
    save_file(
        {k: state[k].detach().contiguous().clone() for k in manifest["tensors"]},
        str(final / "model.safetensors"),
        metadata={"format": "pt"},
    )
    del model, state
    index = json.loads((DEVICE_STAGE / "index.json").read_text())
    for key in index:  # the local folder's config and tokenizer, verbatim
        if key.startswith(f"{name}/") and key.endswith(".gz"):
            (final / Path(key).name[:-3]).write_bytes(gzip.decompress(_read(key)))
    got, want = tensor_digests(final / "model.safetensors"), manifest["tensors"]
    bad = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    if bad or not set(want) <= set(got) | {"lm_head.weight"}:  # lm_head may be tied
        shutil.rmtree(final)
        raise SystemExit(
            f"{name}: differs from the local model: {len(bad)} tensors {bad[:5]}, "
            f"missing {sorted(set(want) - set(got))[:5]}"
        )
    spec = MODEL_SPECS[name]
    marker = {"name": name, "gguf_sha256": spec.sha256, "built_s": round(time.time() - t0)}
    (final / MARKER_FILE).write_text(json.dumps(marker))
    print(f"{name}: {len(got)} tensors identical to the local model ({time.time() - t0:.0f} s)")


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "stage":
        stage(args)
    elif cmd == "take":
        take(Path(args[0]))
    elif cmd == "build":
        for name in args:
            build(name)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
