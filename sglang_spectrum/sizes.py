"""Sizes of the request path (:mod:`.transfer`): per-layout constants, token budgets
and the region bounds a sender and a receiver reserve, for every source pool dtype
(bf16/fp16/fp32 and FP8). Cached per layout; the caches are thread-safe.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .codec import SOURCE_DTYPES, KVLayout, config_layout, fixed_overhead
from .config import SpectrumConfig, SpectrumConfigError
from .fp8 import dtype_name
from .policy import Tier, allowed_tiers

PART_ALIGN = 4096  # bytes: start of each part of a request sent in parts

_LOCK = threading.Lock()
_CACHE_SIZE = 256


class _LRU(OrderedDict):
    """A small thread-safe LRU (``get`` / ``put``) for per-layout constants."""

    def __init__(self, size: int = _CACHE_SIZE):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        with _LOCK:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with _LOCK:
            self[key] = value
            if len(self) > self.size:
                self.popitem(last=False)
        return value


@dataclass(frozen=True)
class _Layout:
    """Constants of one (shape, T, config) layout: computed once, cached."""

    layout: KVLayout
    costs: tuple[int, int, int, int]  # bytes of one token (all layers, K and V) per tier
    full_nbytes: int
    overhead: int  # codec.fixed_overhead
    policy: str


_LAYOUTS = _LRU()


def _config_key(config: SpectrumConfig) -> tuple:
    return (
        config.budget,
        config.tiers,
        config.allocator,
        config.method,
        config.sinks,
        config.window,
        config.group_size,
        config.rotation,
        config.key_scales,
        config.key_block,
        config.allow_drop,
    )


def _policy(config: SpectrumConfig) -> str:
    return f"{config.method}/{config.allocator}/{config.tiers}/b={config.budget:g}"


def _layout_info(
    num_tokens: int,
    num_layers: int,
    heads: int,
    head_dim: int,
    dtype: str,
    config: SpectrumConfig,
    kv_scales: tuple[float, ...] | None = None,
) -> _Layout:
    """``kv_scales``: an FP8 source's 2L scales (None: 1.0; sizes do not depend on them)."""
    key = (num_tokens, num_layers, heads, head_dim, dtype, _config_key(config), kv_scales)

    def make() -> _Layout:
        lay = config_layout(
            config, num_layers, heads, head_dim, dtype, num_tokens, kv_scales=kv_scales
        )
        lay.validate()
        per_row = [lay.key_row_nbytes(t) + lay.row_nbytes(t) for t in Tier]
        return _Layout(
            layout=lay,
            costs=tuple(num_layers * c for c in per_row),
            full_nbytes=lay.full_nbytes,
            overhead=fixed_overhead(lay),
            policy=_policy(config),
        )

    return _LAYOUTS.get_or(key, make)


def _budget(info: _Layout, config: SpectrumConfig) -> int:
    """``codec.token_budget`` for a layout whose tokens all cost ``info.costs`` (every
    layer holds every position): the same integer, without the ``[T, 4]`` table."""
    lay, c = info.layout, info.costs
    t = lay.num_tokens
    budget = math.floor(config.budget * info.full_nbytes) - info.overhead
    if config.budget >= lay.lossless_budget:
        budget = max(budget, t * c[Tier.FP16])
    if not config.allow_drop:
        sinks = min(config.sinks, t)
        base = allowed_tiers(config, fp8_source=lay.fp8)[-1]
        budget = max(budget, sinks * c[Tier.FP16] + (t - sinks) * c[base])
    return budget


def _dtype_name(dtype: torch.dtype | str, error=SpectrumConfigError) -> str:
    name = dtype_name(dtype)
    if name not in SOURCE_DTYPES:
        raise error(
            f"unsupported KV dtype {dtype} (bfloat16, float16, float32, float8_e4m3fn, float8_e5m2)"
        )
    return name


def pool_pair_problem(source: torch.dtype | str, dest: torch.dtype | str) -> str | None:
    """None when buffers packed from pools of dtype ``source`` (the prefill's logical KV
    dtype: ``torch.bfloat16``, ``torch.float8_e4m3fn``, SGLang's ``"fp8_e4m3"``, ...)
    unpack into pools of dtype ``dest`` (the decode's); else the one-line reason.

    Every pair of bfloat16, float16, float32, float8_e4m3fn and float8_e5m2 is
    supported (FP8 destinations store with their own scales)."""
    for side, dtype in (("prefill", source), ("decode", dest)):
        if dtype_name(dtype) not in SOURCE_DTYPES:
            return (
                f"SpectrumKV cannot use the {side}'s KV cache dtype {dtype} (supported:"
                f" {', '.join(SOURCE_DTYPES)})"
            )
    return None


def packed_size_bound(
    num_tokens: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype | str,
    config: SpectrumConfig,
    parts: int = 1,
) -> int:
    """Upper bound of :attr:`PackedRequest.nbytes` for any request of this size under
    ``config`` with ``allow_drop=False`` (as in serving): the send region the prefill
    allocates and the receive region the decode reserves. Cached per layout.

    ``dtype`` is the logical dtype of the *packing* (prefill) pools: bf16/fp16/fp32 or
    ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` (names and SGLang's ``"fp8_e4m3"``
    accepted), whatever the receiver's pools are. The bounds differ: an FP8 source at a
    budget >= 0.5 is sent whole (header on top), a 16-bit one at the budget.

    ``token_budget + fixed_overhead`` of the layout (the codec's own guarantee);
    context slots only lower it (fewer forced sinks among the sent tokens).

    ``parts > 1``: room for the request packed as up to ``parts`` consecutive
    buffers, each starting at a multiple of :data:`PART_ALIGN` (one per prefill
    chunk): each extra part may add a fixed overhead, its alignment and, while the
    no-drop floor rules, the FP16 rows of the sinks. A sender of parts still checks
    each part against the region it was given (this slack only makes room).
    """
    config = config if not config.allow_drop else config.with_(allow_drop=False)
    info = _layout_info(
        max(int(num_tokens), 1), num_layers, num_kv_heads, head_dim, _dtype_name(dtype), config
    )
    bound = _budget(info, config) + info.overhead
    if parts > 1:
        sinks = min(config.sinks, info.layout.num_tokens) * info.costs[Tier.FP16]
        bound += (parts - 1) * (info.overhead + PART_ALIGN) + sinks
    return bound


def part_offset(nbytes: int) -> int:
    """Where the part after ``nbytes`` of earlier parts starts (a multiple of
    :data:`PART_ALIGN`, so every part's segments stay aligned)."""
    return -(-int(nbytes) // PART_ALIGN) * PART_ALIGN
