"""Token importance scoring (first layer of the data flow; torch only, no SGLang).

Every scorer returns a float32 tensor ``[num_tokens]`` (shared by all layers)
or ``[num_layers, num_tokens]`` with ``per_layer=True``; larger means more
important. Layers may hold only a suffix of the prompt (sliding-window layers):
layer ``l`` holds positions ``layer_first_pos[l] .. num_tokens - 1`` and its
keys tensor has ``num_tokens - layer_first_pos[l]`` rows.

Scorers:
- observation-window attention (SnapKV): the softmax attention of the last
  ``window`` query positions over all keys, summed over those queries, summed
  over the query heads sharing a KV head (GQA), smoothed by a small max-pool.
- key norm (fallback without queries): tokens whose keys have a *small* L2 norm
  draw more attention (Devoto et al., 2024), so the score is the negated norm,
  turned into per-layer ranks so that layers are comparable.
Attention sinks (the first ``sinks`` tokens) and the recent window (the last
``window`` tokens) are then lifted above every other token, sinks highest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import SpectrumConfigError

_POOL_KERNEL = 7  # SnapKV's clustering kernel: keep neighbours of a hot token together


def infer_layer_first_pos(
    keys: Sequence[torch.Tensor], num_tokens: int | None = None
) -> tuple[int, list[int]]:
    """Prompt length and first held position per layer, from per-layer key lengths."""
    lengths = [int(k.shape[0]) for k in keys]
    total = max(lengths) if num_tokens is None else int(num_tokens)
    if any(n > total for n in lengths):
        raise SpectrumConfigError(f"a layer holds {max(lengths)} tokens but num_tokens={total}")
    return total, [total - n for n in lengths]


def attention_scores(
    keys: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor],
    num_tokens: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Observation-window attention mass per layer and token.

    Args:
        keys: per layer ``[T_l, kv_heads, head_dim]`` (post-RoPE).
        queries: per layer ``[w, q_heads, head_dim]``: the post-RoPE queries of
            the last ``w`` prompt positions; ``q_heads`` a multiple of ``kv_heads``.
        scale: softmax scale, default ``1/sqrt(head_dim)``.

    Returns:
        float32 ``[num_layers, num_tokens]``, each row summing to ~1 over the
        positions the layer holds (0 elsewhere).
    """
    if len(queries) != len(keys):
        raise SpectrumConfigError(f"got queries for {len(queries)} layers, keys for {len(keys)}")
    total, first = infer_layer_first_pos(keys, num_tokens)
    out = torch.zeros(len(keys), total, dtype=torch.float32, device=keys[0].device)
    for layer, (k, q) in enumerate(zip(keys, queries)):
        n_k, kv_heads, head_dim = k.shape
        w, q_heads, _ = q.shape
        if q_heads % kv_heads:
            raise SpectrumConfigError(
                f"{q_heads} query heads do not group over {kv_heads} KV heads"
            )
        group = q_heads // kv_heads
        s = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        kf = k.float().permute(1, 0, 2)  # [kv, T_l, D]
        qf = q.float().reshape(w, kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kv, g, w, D]
        logits = torch.einsum("hgwd,htd->hgwt", qf, kf) * s
        # Causal mask: query i sits at absolute position total - w + i.
        q_pos = torch.arange(total - w, total, device=k.device)
        k_pos = torch.arange(first[layer], total, device=k.device)
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = logits.softmax(dim=-1).sum(dim=(1, 2))  # [kv, T_l]
        if n_k >= _POOL_KERNEL:
            probs = F.max_pool1d(probs[:, None], _POOL_KERNEL, 1, _POOL_KERNEL // 2)[:, 0]
        row = probs.mean(dim=0)
        out[layer, first[layer] :] = row / row.sum().clamp_min(1e-30)
    return out


def key_norm_scores(keys: Sequence[torch.Tensor], num_tokens: int | None = None) -> torch.Tensor:
    """Key-norm fallback: per-layer rank of ``-||k||`` in [0, 1] (1 = smallest norm).

    Returns float32 ``[num_layers, num_tokens]`` (0 at positions a layer does not hold).
    """
    total, first = infer_layer_first_pos(keys, num_tokens)
    out = torch.zeros(len(keys), total, dtype=torch.float32, device=keys[0].device)
    for layer, k in enumerate(keys):
        norm = k.float().norm(dim=-1).mean(dim=-1)  # [T_l]
        n = norm.numel()
        if n == 0:
            continue
        ranks = torch.empty(n, dtype=torch.float32, device=k.device)
        ranks[torch.argsort(norm, descending=True, stable=True)] = torch.arange(
            n, dtype=torch.float32, device=k.device
        )
        out[layer, first[layer] :] = (ranks + 1) / n
    return out


def lift_sinks_and_recent(scores: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """Rank sinks above everything, then the recent window, then the rest.

    Works on ``[T]`` or ``[L, T]``; returns a new tensor.
    """
    out = scores.clone()
    total = out.shape[-1]
    top = out.amax() if out.numel() else torch.tensor(0.0)
    if recent > 0:
        out[..., max(0, total - recent) :] = top + 1.0 + out[..., max(0, total - recent) :]
    if sinks > 0:
        out[..., : min(sinks, total)] = top + 3.0
    return out


def score_tokens(
    keys: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor] | None = None,
    *,
    sinks: int = 4,
    window: int = 32,
    num_tokens: int | None = None,
    per_layer: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Importance of every prompt token, sinks and recent window lifted.

    Uses observation-window attention when ``queries`` are given (only the last
    ``window`` of them are used), else the key-norm fallback. Layer rows are
    averaged over the layers that hold each position unless ``per_layer``.

    Returns float32 ``[num_tokens]`` or ``[num_layers, num_tokens]``.
    """
    if not keys:
        raise SpectrumConfigError("keys must hold at least one layer")
    if queries is not None and window > 0:
        per_layer_scores = attention_scores(keys, [q[-window:] for q in queries], num_tokens, scale)
    else:
        per_layer_scores = key_norm_scores(keys, num_tokens)
    if per_layer:
        return lift_sinks_and_recent(per_layer_scores, sinks, window)
    _, first = infer_layer_first_pos(keys, num_tokens)
    total = per_layer_scores.shape[1]
    held = torch.zeros(total, dtype=torch.float32, device=per_layer_scores.device)
    for f in first:
        held[f:] += 1
    merged = per_layer_scores.sum(dim=0) / held.clamp_min(1)
    return lift_sinks_and_recent(merged, sinks, window)
