"""One evaluation step: prompt KV -> the real codec -> continue on the degraded cache.

Shared by the perplexity protocol, needle-in-a-haystack and the HF probe engine.

Two degradations: :func:`degrade` (every codec method: ``pack_kv`` -> bytes ->
``decode_kv``) and :func:`pool_cast_kv` (the FP8 KV-cache baselines: the cast
SGLang's FP8 pool applies when it stores K and V, and its read-back).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from ..codec import decode_kv, pack_kv
from ..config import ALLOCATORS, SpectrumConfig, SpectrumConfigError
from ..scoring import score_tokens
from .methods import AutoTiers, Method, parse_method


def degrade(
    kv,
    config: SpectrumConfig,
    use_queries: bool = True,
    dtype=None,
    scores=None,
    fp8_scales: KVScales | None = None,
):
    """Send a prompt's KV through ``pack_kv -> bytes -> decode_kv``.

    Args:
        kv: :class:`~sglang_spectrum.eval.hf_bridge.PromptKV`.
        scores: importance ``[T]`` to allocate tiers by (e.g. :func:`first_layers_scores`);
            default: the codec scores the tokens itself.
        fp8_scales: pack from an FP8 e4m3 pool (``+fp8``): K and V are first stored as
            SGLang's FP8 KV cache does, ``(x / scale).to(float8_e4m3fn)``, with these
            per-layer scales; the codec's top tier is then those FP8 bytes.
    Returns:
        (keys, values, kept, bytes_ratio, key): per-layer ``[T_l, H, D]`` tensors
        in ``dtype`` (default: the KV's), bool ``[T]``, packed / full bytes, and
        a key that is equal for two runs exactly when their packed bytes are.
    """
    queries = kv.queries if use_queries else None
    keys, values, fp8 = kv.keys, kv.values, None
    if fp8_scales is not None:
        from ..fp8 import FP8Pool

        e4m3 = torch.float8_e4m3fn
        keys = [fp8_store(k.float(), e4m3, s) for k, s in zip(keys, fp8_scales.k)]
        values = [fp8_store(v.float(), e4m3, s) for v, s in zip(values, fp8_scales.v)]
        fp8 = FP8Pool.of(e4m3, len(keys), list(fp8_scales.k), list(fp8_scales.v))
    packed = pack_kv(
        keys, values, config, scores=scores, queries=queries, num_tokens=kv.num_tokens, fp8=fp8
    )
    # On a GPU the buffer arrives in the decode node's GPU memory.
    wire = packed.to_bytes() if kv.keys[0].device.type == "cpu" else packed.to_tensor()
    keys, values, kept = decode_kv(wire, dtype=dtype or kv.keys[0].dtype)
    h = packed.header
    key = (h.tier_map, h.checksum, h.payload_nbytes, msgspec.msgpack.encode(h.layout))
    return keys, values, kept, packed.bytes_ratio, key


# --------------------------------------------------------------------------- +knG


def first_layers_scores(kv, layers: int, config: SpectrumConfig) -> torch.Tensor:
    """Key-norm importance ``[T]`` from layers ``0..layers-1`` only (``+knG``).

    The same scorer the codec uses for ``+kn`` (``score_tokens`` without queries:
    per-layer ranks of ``-||k||`` averaged over layers, sinks and recent window
    lifted), on the first ``layers`` layers: the tier map a layer-pipelined prefill
    can decide as soon as its first layer group is computed. With ``layers`` = all
    layers of a model without sliding windows it equals ``+kn`` exactly.

    Sliding-window layers (Gemma 3) score from :attr:`PromptKV.full_keys` (every
    position's key, as SGLang's pool holds them); the prompt KV must then come from
    ``prefill(..., full_keys=True)``.
    """
    n = len(kv.keys)
    if not 1 <= layers <= n:
        raise SpectrumConfigError(f"+kn{layers}: the model has {n} layers")
    keys = kv.full_keys
    if keys is None:
        if any(kv.layer_first_pos[:layers]):
            raise SpectrumConfigError(
                "+knG on sliding-window layers needs prefill(..., full_keys=True)"
            )
        keys = kv.keys
    return score_tokens(
        keys[:layers], None, sinks=config.sinks, window=config.window, num_tokens=kv.num_tokens
    )


# --------------------------------------------------------------------------- FP8 pools


@dataclass(frozen=True)
class KVScales:
    """Per-layer FP8 KV-cache scales, as SGLang's attention layers hold them
    (``layer.k_scale`` / ``layer.v_scale``: one float per layer and tensor)."""

    k: tuple[float, ...]
    v: tuple[float, ...]
    source: str = "1.0 (no scales provided)"

    @classmethod
    def ones(cls, num_layers: int, source: str = "1.0 (no scales provided)") -> KVScales:
        return cls((1.0,) * num_layers, (1.0,) * num_layers, source)


# Checkpoint tensor names SGLang maps to an attention layer's KV scales
# (model_loader/weight_utils.py: maybe_remap_kv_scale_name): the deprecated
# kv_scale (K and V), k_scale / v_scale (also under k_proj / v_proj, modelopt),
# and quark's k_proj.output_scale / v_proj.output_scale.
_SCALE_NAME = re.compile(
    r"layers\.(\d+)\..*?(?:(?P<kv>kv_scale)|(?P<k>k_scale|k_proj\.output_scale)"
    r"|(?P<v>v_scale|v_proj\.output_scale))$"
)


def checkpoint_kv_scales(folder: str | os.PathLike[str], num_layers: int) -> KVScales:
    """The FP8 KV scales stored in a checkpoint folder's safetensors, per SGLang's rules.

    SGLang (``layers/quantization/kv_cache.py``) starts every layer at -1 and, after
    loading: K and V scales both positive -> each as is; neither -> 1.0 for both; only
    one (e.g. the deprecated ``kv_scale``) -> the larger of the two for both. (On ROCm
    fnuz FP8 it doubles them; not modelled.) SGLang creates these parameters when the
    checkpoint's quantization config has a KV-cache method (FP8 checkpoints); a folder
    without such tensors -- every stand-in model here, converted from GGUF -- gets 1.0.
    """
    from safetensors import safe_open

    k = [-1.0] * num_layers
    v = [-1.0] * num_layers
    found = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                m = _SCALE_NAME.search(name)
                if not m or int(m.group(1)) >= num_layers:
                    continue
                layer, value = int(m.group(1)), float(st.get_tensor(name).float().max())
                found += 1
                if m.group("kv") or m.group("k"):
                    k[layer] = value
                if m.group("v"):
                    v[layer] = value
    if not found:
        return KVScales.ones(num_layers, "1.0 (no KV scales in the checkpoint)")
    for layer, (ks, vs) in enumerate(zip(k, v)):
        if ks <= 0 or vs <= 0:  # neither: 1.0; one of them: it, for K and V alike
            k[layer] = v[layer] = max(ks, vs) if max(ks, vs) > 0 else 1.0
    return KVScales(tuple(k), tuple(v), f"checkpoint ({found} scale tensors)")


def quantization_param_kv_scales(
    path: str | os.PathLike[str], num_layers: int, tp_rank: int = 0
) -> KVScales:
    """Scales from SGLang's ``--quantization-param-path`` JSON
    (``{"kv_cache": {"dtype": ..., "scaling_factor": {rank: {layer: s}}}}``): one
    factor per layer for K and V alike (SGLang honours it for ``fp8_e4m3`` only)."""
    table = json.loads(Path(path).read_text())["kv_cache"]["scaling_factor"][str(tp_rank)]
    k = [1.0] * num_layers
    for layer, s in table.items():
        if int(layer) < num_layers:
            k[int(layer)] = float(s)
    return KVScales(tuple(k), tuple(k), f"quantization-param-path {Path(path).name}")


def model_kv_scales(model, num_layers: int) -> KVScales:
    """The scales SGLang would use for this HF model's folder (see :func:`checkpoint_kv_scales`)."""
    folder = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    if folder and Path(folder).is_dir():
        return checkpoint_kv_scales(folder, num_layers)
    return KVScales.ones(num_layers)


def run_needs(model, runs, kv_scales: KVScales | None = None) -> tuple[bool, KVScales | None]:
    """What a list of runs needs from the prefill and the model: ``(full_keys, kv_scales)``:
    whether some ``+knG`` run needs every layer's keys over the whole prompt, and the FP8
    scales (``kv_scales``, else the model folder's) if some run is an FP8 baseline."""
    full_keys = any(m.key_norm_layers for m, _, _ in runs)
    if any(m.is_pool_cast or m.fp8_pool for m, _, _ in runs) and kv_scales is None:
        from .hf_bridge import layer_types

        kv_scales = model_kv_scales(model, len(layer_types(model)))
    return full_keys, kv_scales


def fp8_store(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """What an FP8 KV pool holds for ``x``: SGLang's ``set_kv_buffer`` stores
    ``(x / scale).to(fp8)`` (the division only when a scale is set). The cast is torch's
    ``.to(float8)`` as SGLang's plain path calls it: e4m3 saturates at +-448 (torch's
    conversion), e5m2 overflows to inf past 57344."""
    return (x if scale == 1.0 else x / scale).to(dtype)


def fp8_round_trip(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """What an FP8 KV pool gives back for ``x``: :func:`fp8_store`, then the attention
    reads the FP8 values times the scale. Returned in ``x``'s dtype."""
    return (fp8_store(x, dtype, scale).to(torch.float32) * scale).to(x.dtype)


def pool_cast_kv(kv, dtype: torch.dtype, scales: KVScales | None = None):
    """The FP8 baseline's degradation of a prompt's KV (the eval's "pool cast" path):
    K and V of every layer through :func:`fp8_round_trip` with that layer's scales.

    Returns ``(keys, values, kept, bytes_ratio, key)`` like :func:`degrade`. Bytes: one
    per element against two, no header: exactly 0.5. Nothing is dropped.
    """
    n = len(kv.keys)
    scales = scales or KVScales.ones(n)
    if len(scales.k) != n or len(scales.v) != n:
        raise SpectrumConfigError(f"{len(scales.k)} KV scales for {n} layers")
    keys = [fp8_round_trip(k, dtype, s) for k, s in zip(kv.keys, scales.k)]
    values = [fp8_round_trip(v, dtype, s) for v, s in zip(kv.values, scales.v)]
    elements = sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))
    ratio = (elements * torch.finfo(dtype).bits / 8) / (elements * 2)
    kept = torch.ones(kv.num_tokens, dtype=torch.bool)
    return keys, values, kept, ratio, ("pool-cast", str(dtype), scales.k, scales.v)


def generate_on(model, kv, keys, values, kept, max_new_tokens: int, eos_token_id) -> list[int]:
    """Greedy answer on degraded prompt KV; the first token comes from the
    prefill's own (full-precision) last logits, as on a real prefill node."""
    from .hf_bridge import greedy_generate_from_kv

    return greedy_generate_from_kv(
        model,
        keys,
        values,
        kv.layer_first_pos,
        kv.num_tokens,
        kept,
        kv.logits_last,
        max_new_tokens,
        eos_token_id,
    )


def method_config(method: Method, allocator: str, budget: float, auto_tiers: AutoTiers):
    return method.config(budget, allocator if allocator in ALLOCATORS else "paper", auto_tiers)


def apply_method(
    model,
    kv,
    method: Method | str,
    allocator: str,
    budget: float,
    auto_tiers: AutoTiers = "2",
    *,
    next_ids: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    eos_token_id: int | None = None,
    memo: dict | None = None,
    post=None,
    kv_scales: KVScales | None = None,
):
    """Degrade ``kv`` with one method, then either score ``next_ids`` (returns
    ``(logits [M, vocab], bytes_ratio)``) or decode greedily (returns
    ``(token ids, bytes_ratio)``).

    Codec methods go through :func:`degrade` (``+knG``: tiers from
    :func:`first_layers_scores`), the FP8 baselines through :func:`pool_cast_kv`
    with ``kv_scales`` (default 1.0).

    ``memo`` (one dict per prompt) skips the model when an earlier method
    produced the very same packed bytes (e.g. uniform INT4 at every budget
    it fits, or ``spectrum-auto`` and the tier mode it resolved to).
    ``post`` maps the output (e.g. logits to a mean NLL) before it is
    returned and memoised.
    """
    from .hf_bridge import continue_from_kv

    method = parse_method(method) if isinstance(method, str) else method
    if method.is_pool_cast:
        keys, values, kept, ratio, key = pool_cast_kv(kv, method.pool_dtype, kv_scales)
    else:
        config = method_config(method, allocator, budget, auto_tiers)
        scores = None
        if method.key_norm_layers:
            scores = first_layers_scores(kv, method.key_norm_layers, config)
        fp8_scales = None
        if method.fp8_pool:
            fp8_scales = kv_scales or KVScales.ones(len(kv.keys))
        keys, values, kept, ratio, key = degrade(
            kv, config, use_queries=not method.key_norm, scores=scores, fp8_scales=fp8_scales
        )
    if memo is not None and key in memo:
        return memo[key], ratio
    if next_ids is not None:
        out = continue_from_kv(
            model, keys, values, kv.layer_first_pos, kv.num_tokens, kept, next_ids
        )
    else:
        out = generate_on(model, kv, keys, values, kept, max_new_tokens or 10, eos_token_id)
    if post is not None:
        out = post(out)
    if memo is not None:
        memo[key] = out
    return out, ratio


class HFProbeEngine:
    """The INT4 probe's engine on a Hugging Face model (see :mod:`.probe`)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 10, obs_window: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.obs_window = max_new_tokens, obs_window
        self._kv_ids: torch.Tensor | None = None
        self._kv = None

    def _prefill(self, input_ids: torch.Tensor):
        from .hf_bridge import prefill

        if self._kv_ids is None or not torch.equal(self._kv_ids, input_ids):
            self._kv = prefill(self.model, input_ids[None], obs_window=self.obs_window)
            self._kv_ids = input_ids
        return self._kv

    def _answer(self, input_ids: torch.Tensor, config: SpectrumConfig) -> str:
        kv = self._prefill(input_ids)
        keys, values, kept, _, _ = degrade(kv, config)
        tokens = generate_on(
            self.model, kv, keys, values, kept, self.max_new_tokens, self.tokenizer.eos_token_id
        )
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def full_answer(self, input_ids: torch.Tensor) -> str:
        return self._answer(input_ids, SpectrumConfig(budget=1.0, method="full"))

    def degraded_answer(self, input_ids: torch.Tensor, config: SpectrumConfig) -> str:
        return self._answer(input_ids, config)
