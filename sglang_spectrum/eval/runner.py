"""One evaluation step: prompt KV -> the real codec -> continue on the degraded cache.

Shared by the perplexity protocol, needle-in-a-haystack and the HF probe engine.
"""

from __future__ import annotations

import msgspec
import torch

from ..codec import decode_kv, pack_kv
from ..config import ALLOCATORS, SpectrumConfig
from .methods import AutoTiers, Method, parse_method


def degrade(kv, config: SpectrumConfig, use_queries: bool = True, dtype=None):
    """Send a prompt's KV through ``pack_kv -> bytes -> decode_kv``.

    Args:
        kv: :class:`~sglang_spectrum.eval.hf_bridge.PromptKV`.
    Returns:
        (keys, values, kept, bytes_ratio, key): per-layer ``[T_l, H, D]`` tensors
        in ``dtype`` (default: the KV's), bool ``[T]``, packed / full bytes, and
        a key that is equal for two runs exactly when their packed bytes are.
    """
    queries = kv.queries if use_queries else None
    packed = pack_kv(kv.keys, kv.values, config, queries=queries, num_tokens=kv.num_tokens)
    # On a GPU the buffer arrives in the decode node's GPU memory.
    wire = packed.to_bytes() if kv.keys[0].device.type == "cpu" else packed.to_tensor()
    keys, values, kept = decode_kv(wire, dtype=dtype or kv.keys[0].dtype)
    h = packed.header
    key = (h.tier_map, h.checksum, h.payload_nbytes, msgspec.msgpack.encode(h.layout))
    return keys, values, kept, packed.bytes_ratio, key


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
):
    """Degrade ``kv`` with one method, then either score ``next_ids`` (returns
    ``(logits [M, vocab], bytes_ratio)``) or decode greedily (returns
    ``(token ids, bytes_ratio)``).

    ``memo`` (one dict per prompt) skips the model when an earlier method
    produced the very same packed bytes (e.g. uniform INT4 at every budget
    it fits, or ``spectrum-auto`` and the tier mode it resolved to).
    ``post`` maps the output (e.g. logits to a mean NLL) before it is
    returned and memoised.
    """
    from .hf_bridge import continue_from_kv

    method = parse_method(method) if isinstance(method, str) else method
    config = method_config(method, allocator, budget, auto_tiers)
    keys, values, kept, ratio, key = degrade(kv, config, use_queries=not method.key_norm)
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
