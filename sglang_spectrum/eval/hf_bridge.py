"""Bridge between a Hugging Face causal LM (transformers 5.3) and our KV codec.

The codec sees a prompt's KV cache as Python lists with one entry per layer, each a
token-major tensor ``[tokens_held_by_layer, num_kv_heads, head_dim]`` (HF keeps
``[batch, heads, tokens, dim]``), plus ``layer_first_pos[l]``: the absolute position of
the first token layer ``l`` holds. Layer ``l`` therefore holds the contiguous positions
``layer_first_pos[l] .. num_tokens - 1``.

* Full-attention layers hold every prompt position (``layer_first_pos == 0``).
* Gemma 3's sliding-window layers (window ``W`` = 512): a query at position ``q`` attends
  to keys at ``q - W < p <= q``, so the next token (at ``T``) needs only the last
  ``W - 1`` prompt positions, and that is exactly what transformers'
  ``DynamicSlidingWindowLayer`` keeps after a prefill of ``T`` tokens: the first held
  position is ``max(0, T - W + 1)`` (not ``T - W``). :func:`prefill` reads it from the
  cache itself.

Keys are post-RoPE (as stored in the cache, and as SGLang stores them). Grouped-query
attention: query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PromptKV",
    "continue_from_kv",
    "greedy_generate_from_kv",
    "layer_types",
    "prefill",
    "sliding_window",
]


@dataclass
class PromptKV:
    """A prompt's KV cache in codec layout.

    keys, values: per layer ``[T - layer_first_pos[l], num_kv_heads, head_dim]``, model dtype.
    queries: per layer, post-RoPE query states of the last ``min(obs_window, T)`` prompt
        positions, ``[obs_window, num_q_heads, head_dim]``; ``None`` if not captured.
    layer_first_pos: absolute position of each layer's first held token.
    num_tokens: prompt length ``T``.
    logits_last: logits of the last prompt position, ``[vocab]`` float32.
    full_keys: with ``prefill(..., full_keys=True)``: per layer the post-RoPE keys of all
        ``T`` positions, ``[T, num_kv_heads, head_dim]``, as a KV pool without sliding
        windows (SGLang's, which SpectrumKV serves from) holds them. The same tensor as
        ``keys[l]`` for layers that hold the whole prompt; for sliding-window layers the
        keys the layer computed for every position (the cache keeps only the suffix).
        Used to score tokens from chosen layers (``+knG``); ``None`` if not captured.
    """

    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor] | None
    layer_first_pos: list[int]
    num_tokens: int
    logits_last: Tensor
    full_keys: list[Tensor] | None = None


# --------------------------------------------------------------------------- model info


def _text_config(model):
    return model.config.get_text_config(decoder=True)


def layer_types(model) -> list[str]:
    """Per layer ``"full_attention"`` or ``"sliding_attention"`` (as the model uses them)."""
    cfg = _text_config(model)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    return list(types[: cfg.num_hidden_layers])


def sliding_window(model) -> int | None:
    """The sliding window ``W`` of the model's sliding layers, or ``None`` if it has none."""
    if "sliding_attention" not in layer_types(model):
        return None
    return int(_text_config(model).sliding_window)


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


# --------------------------------------------------------------------------- prefill


@contextmanager
def _capture_queries(
    model, obs_window: int, keys: bool = False
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Record post-RoPE queries (and, with ``keys``, all post-RoPE keys) by wrapping the
    modeling module's ``apply_rotary_pos_emb``.

    Every supported attention (llama, qwen2, gemma3 in transformers 5.3) calls the module
    global ``apply_rotary_pos_emb(q, k, cos, sin)`` once per layer, in layer order, with
    ``q`` shaped ``[batch, q_heads, tokens, head_dim]`` (``k`` likewise with KV heads);
    its ``k`` output is what the layer caches. Yields ``(queries, keys)``: per layer
    ``[obs_window, q_heads, head_dim]`` (none if ``obs_window`` is 0) and
    ``[tokens, kv_heads, head_dim]`` (none unless ``keys``). The original is restored on
    exit, even on error.
    """
    mod = sys.modules[type(model).__module__]
    orig = getattr(mod, "apply_rotary_pos_emb", None)
    if orig is None:
        raise NotImplementedError(f"{mod.__name__} has no apply_rotary_pos_emb to wrap")
    captured: list[Tensor] = []
    captured_keys: list[Tensor] = []

    def wrapper(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = orig(q, k, cos, sin, *args, **kwargs)
        if obs_window > 0:
            captured.append(q_embed[0, :, -obs_window:, :].transpose(0, 1).detach().clone())
        if keys:
            captured_keys.append(k_embed[0].transpose(0, 1).detach().contiguous())
        return q_embed, k_embed

    mod.apply_rotary_pos_emb = wrapper
    try:
        yield captured, captured_keys
    finally:
        mod.apply_rotary_pos_emb = orig


@torch.no_grad()
def prefill(model, input_ids: Tensor, obs_window: int = 32, full_keys: bool = False) -> PromptKV:
    """Run the prompt once (``use_cache=True``) and return its KV in codec layout.

    Args:
        model: a transformers causal LM (llama, qwen2 or gemma3 family), eval mode.
        input_ids: ``[1, T]`` long.
        obs_window: how many trailing prompt positions' queries to capture (0: none).
        full_keys: also return every layer's keys over all ``T`` positions
            (:attr:`PromptKV.full_keys`; captured only for sliding-window layers).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
    from transformers import DynamicCache

    _, device = _model_dtype_device(model)
    input_ids = input_ids.to(device)
    T = int(input_ids.shape[1])
    n_layers = len(layer_types(model))
    cache = DynamicCache(config=model.config)
    kwargs = dict(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    queries: list[Tensor] | None = None
    capture_keys = full_keys and "sliding_attention" in layer_types(model)
    all_keys: list[Tensor] = []
    if obs_window > 0 or capture_keys:
        with _capture_queries(model, obs_window, keys=capture_keys) as (captured, all_keys):
            out = model(**kwargs)
        for what, got, wanted in (
            ("query", captured, obs_window > 0),
            ("key", all_keys, capture_keys),
        ):
            if wanted and len(got) != n_layers:
                raise RuntimeError(f"captured {len(got)} {what} sets for {n_layers} layers")
        queries = captured if obs_window > 0 else None
    else:
        out = model(**kwargs)

    keys, values, first = [], [], []
    for layer in out.past_key_values.layers[:n_layers]:
        k = layer.keys[0].transpose(0, 1).contiguous()  # [held, Hkv, D]
        v = layer.values[0].transpose(0, 1).contiguous()
        keys.append(k)
        values.append(v)
        first.append(T - k.shape[0])  # a layer holds a suffix of the prompt
    whole = None
    if full_keys:
        whole = [k if f == 0 else all_keys[li] for li, (k, f) in enumerate(zip(keys, first))]
    return PromptKV(
        keys=keys,
        values=values,
        queries=queries,
        layer_first_pos=first,
        num_tokens=T,
        logits_last=out.logits[0, -1].float(),
        full_keys=whole,
    )


# --------------------------------------------------------------------------- continue


def _build_cache(
    model,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    layer_first_pos: Sequence[int],
    num_prompt_tokens: int,
):
    """A fresh DynamicCache (layer kinds from the config) filled with the given prompt KV."""
    from transformers import DynamicCache

    types = layer_types(model)
    if not (len(keys) == len(values) == len(layer_first_pos) == len(types)):
        raise ValueError(
            f"got {len(keys)} keys / {len(values)} values / {len(layer_first_pos)} first "
            f"positions for a model with {len(types)} layers"
        )
    dtype, device = _model_dtype_device(model)
    cache = DynamicCache(config=model.config)
    for li, (layer, k, v, first) in enumerate(zip(cache.layers, keys, values, layer_first_pos)):
        held = num_prompt_tokens - int(first)
        if k.shape[0] != held or v.shape[0] != held:
            raise ValueError(
                f"layer {li}: holds positions {first}..{num_prompt_tokens - 1} ({held} tokens) "
                f"but keys/values have {k.shape[0]}/{v.shape[0]} rows"
            )
        # [held, H, D] -> HF [1, H, held, D]. A sliding layer keeps only its last W-1 rows
        # and counts all prompt tokens as seen, as after an uninterrupted prefill.
        layer.update(
            k.to(device=device, dtype=dtype).transpose(0, 1).unsqueeze(0),
            v.to(device=device, dtype=dtype).transpose(0, 1).unsqueeze(0),
        )
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = num_prompt_tokens
    return cache


def _step_masks(
    model,
    cache,
    start: int,
    m: int,
    num_prompt_tokens: int,
    kept: Tensor | None,
) -> Tensor | dict[str, Tensor]:
    """Additive float masks for ``m`` new tokens at positions ``start .. start+m-1``.

    Per layer kind the mask is ``[1, 1, m, held + m]`` where ``held`` is what that kind of
    layer currently caches (a suffix of positions ending at ``start - 1``). A key at
    position ``p`` is visible to the query at ``q`` iff ``p <= q``, ``p > q - W`` on
    sliding layers, and, for prompt positions, ``kept[p]``. Additive (0 / dtype min)
    rather than bool because eager attention adds the mask to the scores.
    """
    dtype, device = _model_dtype_device(model)
    types = layer_types(model)
    window = sliding_window(model)
    q_pos = torch.arange(start, start + m, device=device)
    masks: dict[str, Tensor] = {}
    for kind in dict.fromkeys(types):  # unique, in order
        helds = {
            layer.keys.shape[-2] if layer.is_initialized else 0
            for layer, t in zip(cache.layers, types)
            if t == kind
        }
        if len(helds) != 1:  # one mask per layer kind: all layers of a kind must agree
            raise ValueError(f"{kind} layers hold different token counts {sorted(helds)}")
        held = helds.pop()
        k_pos = torch.arange(start - held, start + m, device=device)
        ok = k_pos[None, :] <= q_pos[:, None]
        if kind == "sliding_attention":
            ok &= k_pos[None, :] > q_pos[:, None] - window
        if kept is not None:
            in_prompt = k_pos < num_prompt_tokens
            kp = torch.ones_like(k_pos, dtype=torch.bool)
            kp[in_prompt] = kept.to(device)[k_pos[in_prompt]]
            ok &= kp[None, :]
        mask = torch.zeros(ok.shape, dtype=dtype, device=device)
        mask.masked_fill_(~ok, torch.finfo(dtype).min)
        masks[kind] = mask[None, None]
    if len(masks) == 1 and "sliding_attention" not in masks:
        return masks["full_attention"]  # llama-style models take a plain 4D mask
    return masks  # gemma3/qwen2 models accept a {layer_type: mask} mapping


def _forward_step(model, cache, ids: Tensor, start: int, T: int, kept: Tensor | None) -> Tensor:
    _, device = _model_dtype_device(model)
    m = int(ids.shape[1])
    pos = torch.arange(start, start + m, device=device)
    mask = _step_masks(model, cache, start, m, T, kept)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask,
        position_ids=pos[None],
        cache_position=pos,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[0]


def _check_kept(kept: Tensor | None, T: int) -> Tensor | None:
    if kept is None:
        return None
    kept = torch.as_tensor(kept, dtype=torch.bool)
    if kept.shape != (T,):
        raise ValueError(f"kept must be a bool tensor [{T}], got {tuple(kept.shape)}")
    return kept


@torch.no_grad()
def continue_from_kv(
    model,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    layer_first_pos: Sequence[int],
    num_prompt_tokens: int,
    kept: Tensor | None,
    next_ids: Tensor,
) -> Tensor:
    """Logits of ``next_ids`` run on top of a (possibly degraded) prompt KV cache.

    Args:
        keys, values: per layer ``[num_prompt_tokens - layer_first_pos[l], Hkv, D]`` (any
            float dtype; cast to the model's).
        layer_first_pos: absolute position of each layer's first held token.
        num_prompt_tokens: prompt length ``T``; the new tokens get rotary positions
            ``T .. T+M-1`` even when prompt tokens were dropped.
        kept: bool ``[T]``; ``False`` hides that prompt position from every new token.
            ``None`` keeps all.
        next_ids: ``[1, M]`` long.

    Returns:
        ``[M, vocab]`` float32 logits. With the undegraded KV from :func:`prefill` and
        ``kept=None`` they equal a single forward pass over the ``T + M`` tokens.
    """
    if next_ids.dim() != 2 or next_ids.shape[0] != 1:
        raise ValueError(f"next_ids must be [1, M], got {tuple(next_ids.shape)}")
    kept = _check_kept(kept, num_prompt_tokens)
    cache = _build_cache(model, keys, values, layer_first_pos, num_prompt_tokens)
    return _forward_step(model, cache, next_ids, num_prompt_tokens, num_prompt_tokens, kept).float()


@torch.no_grad()
def greedy_generate_from_kv(
    model,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    layer_first_pos: Sequence[int],
    num_prompt_tokens: int,
    kept: Tensor | None,
    first_token_logits: Tensor,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None,
) -> list[int]:
    """Greedy decoding continuing from a (possibly degraded) prompt KV cache.

    The first new token is ``argmax(first_token_logits)`` (the prompt's last logits, which
    come from the prefill node and are not affected by KV degradation); every later token
    attends to the given prompt KV (``kept`` masks as in :func:`continue_from_kv`) and to
    the generated tokens. Stops after ``max_new_tokens`` tokens or at an EOS token, which
    is not included in the returned ids.
    """
    if max_new_tokens <= 0:
        return []
    eos: set[int] = set()
    if eos_token_id is not None:
        eos = {int(eos_token_id)} if isinstance(eos_token_id, int) else set(map(int, eos_token_id))
    kept = _check_kept(kept, num_prompt_tokens)
    _, device = _model_dtype_device(model)
    tok = int(first_token_logits.argmax())
    out: list[int] = []
    cache = None
    pos = num_prompt_tokens
    while True:
        if tok in eos:
            break
        out.append(tok)
        if len(out) >= max_new_tokens:
            break
        if cache is None:  # built lazily: a one-token answer needs no decode step
            cache = _build_cache(model, keys, values, layer_first_pos, num_prompt_tokens)
        ids = torch.tensor([[tok]], device=device)
        logits = _forward_step(model, cache, ids, pos, num_prompt_tokens, kept)
        pos += 1
        tok = int(logits[-1].argmax())
    return out
