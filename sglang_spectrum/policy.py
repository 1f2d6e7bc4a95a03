"""Tier allocation (second layer of the data flow): scores + byte costs -> tier per token.

Inputs are per-token importance scores ``[T]``, the byte cost of each tier for
each token ``[T, 4]`` *as the codec really pays it* (a token held by fewer
layers, e.g. older than a sliding window, is cheaper), and a byte budget. The
output is a ``uint8 [T]`` tier map (values of :class:`Tier`).

Two rules apply to every allocator:
- forced tokens (attention sinks) are FP16;
- a token is dropped only when not even the cheapest allowed tier is
  affordable, and then the least important tokens go first.

Allocators:
- ``paper``: the rank-ordered waterfall. Everybody starts at the cheapest
  allowed tier; then, tier by tier upwards, tokens are upgraded in order of
  importance while the budget lasts. The most important tokens thus always sit
  in the highest tier (SpectrumKV's ordering rule).
- ``optimal``: minimise sum_t w_t * err_t(tier) subject to the budget, where
  err is the measured reconstruction error of token t at each tier. This is a
  multiple-choice knapsack; Lagrangian relaxation picks, per token,
  ``argmin_k w_t err_tk + lambda * cost_tk``; bisection on lambda finds the
  cheapest feasible multiplier and a greedy pass spends what is left on the
  most efficient remaining upgrades.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import torch

from .config import SpectrumConfig, SpectrumConfigError


class Tier(IntEnum):
    """Precision tier of one token; the value is what the tier map stores."""

    FP16 = 0
    INT8 = 1
    INT4 = 2
    DROP = 3


TIER_NAMES = ("fp16", "int8", "int4", "drop")
QUANT_BITS = {Tier.INT8: 8, Tier.INT4: 4}


def allowed_tiers(config: SpectrumConfig, fp8_source: bool = False) -> list[Tier]:
    """Tiers a method may use besides DROP, most precise first.

    ``fp8_source``: the KV is FP8 (its top tier, the FP8 bytes themselves, is lossless at
    1 byte per element): ``spectrum`` never uses INT8 there, which costs more bytes (codes
    plus scales) for more error; tier mode ``"3"`` is FP8 + INT4, ``"2"`` FP8 alone.
    """
    if config.method == "spectrum":
        if fp8_source:
            return [Tier.FP16, Tier.INT4] if config.tiers == "3" else [Tier.FP16]
        return [Tier.FP16, Tier.INT8, Tier.INT4] if config.tiers == "3" else [Tier.FP16, Tier.INT8]
    return {
        "full": [Tier.FP16],
        "int8": [Tier.INT8],
        "int4": [Tier.INT4],
        "pdtrim": [Tier.FP16],
        "snapkv": [Tier.FP16],
    }[config.method]


def _prefix_fit(order: torch.Tensor, cost: torch.Tensor, money: int) -> tuple[torch.Tensor, int]:
    """Longest prefix of ``order`` whose summed ``cost`` fits in ``money``.

    Returns (chosen token indices, money left).
    """
    if order.numel() == 0 or money <= 0:
        return order[:0], money
    cum = torch.cumsum(cost[order], 0)
    n = int(torch.searchsorted(cum, torch.tensor([money], dtype=cum.dtype), right=True)[0])
    spent = int(cum[n - 1]) if n else 0
    return order[:n], money - spent


def _rank(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Candidate indices sorted by descending score (ties: earlier position first)."""
    return candidates[torch.argsort(scores[candidates], descending=True, stable=True)]


def _start_allocation(
    scores: torch.Tensor,
    costs: torch.Tensor,
    budget_bytes: int,
    allowed: list[Tier],
    forced: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Forced tokens at FP16, everybody else at the cheapest allowed tier while
    affordable (most important first), the rest dropped. Returns (tiers, money left)."""
    num_tokens = scores.numel()
    tiers = torch.full((num_tokens,), int(Tier.DROP), dtype=torch.uint8)
    forced_idx = torch.nonzero(forced).flatten()
    money = budget_bytes - int(costs[forced_idx, Tier.FP16].sum())
    if money < 0:
        raise SpectrumConfigError(
            f"budget of {budget_bytes} bytes cannot hold the {forced_idx.numel()} attention-sink"
            f" tokens at FP16 ({budget_bytes - money} bytes): raise the budget or lower `sinks`"
        )
    tiers[forced_idx] = int(Tier.FP16)
    base = allowed[-1]
    rest = _rank(scores, torch.nonzero(~forced).flatten())
    chosen, money = _prefix_fit(rest, costs[:, base], money)
    tiers[chosen] = int(base)
    # Tokens held by fewer layers are cheaper: give them a chance too.
    for t in rest[chosen.numel() :].tolist():
        c = int(costs[t, base])
        if c <= money:
            tiers[t] = int(base)
            money -= c
    return tiers, money


def waterfall(
    scores: torch.Tensor,
    costs: torch.Tensor,
    budget_bytes: int,
    allowed: list[Tier],
    forced: torch.Tensor,
) -> torch.Tensor:
    """The paper's rank-ordered allocation (see module docstring)."""
    tiers, money = _start_allocation(scores, costs, budget_bytes, allowed, forced)
    for lower, upper in zip(allowed[:0:-1], allowed[-2::-1]):
        candidates = _rank(scores, torch.nonzero(tiers == int(lower)).flatten())
        delta = costs[:, upper] - costs[:, lower]
        chosen, money = _prefix_fit(candidates, delta, money)
        tiers[chosen] = int(upper)
    return tiers


def lagrangian(
    scores: torch.Tensor,
    costs: torch.Tensor,
    budget_bytes: int,
    allowed: list[Tier],
    forced: torch.Tensor,
    errors: torch.Tensor,
    iterations: int = 60,
) -> torch.Tensor:
    """Error-minimising allocation (multiple-choice knapsack, Lagrangian relaxation).

    Args:
        errors: float ``[T, 4]`` measured squared reconstruction error per tier.
    """
    tiers, money = _start_allocation(scores, costs, budget_bytes, allowed, forced)
    base = allowed[-1]
    free = torch.nonzero(tiers == int(base)).flatten()
    if free.numel() == 0 or len(allowed) == 1:
        return tiers
    opts = torch.tensor([int(t) for t in allowed], dtype=torch.long)
    # Importance weights in (0, 1]: errors of important tokens count more.
    s = scores[free].double()
    w = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12) + 1e-3
    err = errors[free][:, opts].double() * w[:, None]  # [F, K]
    extra = (costs[free][:, opts] - costs[free, base][:, None]).double()  # [F, K] >= 0
    money = float(money)

    def choose(lam: float) -> torch.Tensor:
        return torch.argmin(err + lam * extra, dim=1)

    def spend(choice: torch.Tensor) -> float:
        return float(extra.gather(1, choice[:, None]).sum())

    lo, hi = 0.0, 1.0
    while spend(choose(hi)) > money and hi < 1e300:
        hi *= 16.0
    if spend(choose(lo)) <= money:
        hi = lo
    else:
        for _ in range(iterations):
            mid = (lo * hi) ** 0.5 if lo > 0 else hi * 1e-3  # bisection in log space
            if spend(choose(mid)) <= money:
                hi = mid
            else:
                lo = mid
    choice = choose(hi)
    money -= spend(choice)
    # Greedy fill: best error reduction per extra byte among the remaining upgrades.
    cur_err = err.gather(1, choice[:, None])[:, 0]
    cur_extra = extra.gather(1, choice[:, None])[:, 0]
    gain = cur_err[:, None] - err  # [F, K]
    more = extra - cur_extra[:, None]
    ratio = torch.where(
        (more > 0) & (gain > 0), gain / more.clamp_min(1e-12), torch.zeros_like(gain)
    )
    best_k = ratio.argmax(dim=1)
    best = ratio.gather(1, best_k[:, None])[:, 0]
    for i in torch.argsort(best, descending=True).tolist():
        if best[i] <= 0:
            break
        k = int(best_k[i])
        c = float(more[i, k])
        if c <= money:
            choice[i] = k
            money -= c
    tiers[free] = opts[choice].to(torch.uint8)
    return tiers


def pdtrim(
    costs: torch.Tensor, budget_bytes: int, sinks: int, head_fraction: float
) -> torch.Tensor:
    """PDTrim-style pruning: the first and last token runs at FP16, the middle dropped.

    Keeps the largest ``n`` tokens that fit, ``max(sinks, head_fraction * n)``
    of them from the start and the rest from the end.
    """
    num_tokens = costs.shape[0]
    fp16 = costs[:, Tier.FP16]
    prefix = torch.cat([fp16.new_zeros(1), torch.cumsum(fp16, 0)])
    suffix = torch.cat([fp16.new_zeros(1), torch.cumsum(fp16.flip(0), 0)])

    def split(n: int) -> tuple[int, int]:
        head = min(n, max(sinks, round(head_fraction * n)))
        return head, n - head

    def cost(n: int) -> int:
        head, tail = split(n)
        return int(prefix[head] + suffix[tail])

    lo, hi = 0, num_tokens  # cost(lo) fits; find the largest n that fits
    if cost(hi) <= budget_bytes:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    head, tail = split(lo)
    if head < min(sinks, num_tokens):
        raise SpectrumConfigError("budget cannot hold the attention-sink tokens at FP16")
    tiers = torch.full((num_tokens,), int(Tier.DROP), dtype=torch.uint8)
    tiers[:head] = int(Tier.FP16)
    if tail:
        tiers[num_tokens - tail :] = int(Tier.FP16)
    return tiers


def allocate_tiers(
    scores: torch.Tensor,
    costs: torch.Tensor,
    budget_bytes: int,
    config: SpectrumConfig,
    errors: torch.Tensor | None = None,
    fp8_source: bool = False,
) -> torch.Tensor:
    """Choose a tier for every token under a byte budget.

    Args:
        scores: float ``[T]`` importance (higher = more important).
        costs: int64 ``[T, 4]`` bytes each token costs at FP16, INT8, INT4,
            DROP (the last column is normally 0).
        budget_bytes: bytes available for token data.
        config: method, allocator, tiers and sinks.
        errors: float ``[T, 4]`` measured squared reconstruction error per tier;
            required by ``allocator="optimal"`` for the tiered method.
        fp8_source: the KV is FP8 (see :func:`allowed_tiers`).

    Returns:
        uint8 ``[T]`` tier map (values of :class:`Tier`), on CPU.
    """
    scores = scores.detach().float().cpu()
    costs = costs.detach().long().cpu()
    num_tokens = scores.numel()
    if costs.shape != (num_tokens, 4):
        raise SpectrumConfigError(f"costs must be [{num_tokens}, 4], got {tuple(costs.shape)}")
    allowed = allowed_tiers(config, fp8_source)
    if config.method == "pdtrim":
        return pdtrim(costs, budget_bytes, config.sinks, config.pdtrim_head_fraction)
    forced = torch.zeros(num_tokens, dtype=torch.bool)
    if config.method in ("spectrum", "snapkv"):
        forced[: config.sinks] = True
    if config.method == "spectrum" and config.allocator == "optimal":
        if errors is None:
            raise SpectrumConfigError("allocator 'optimal' needs the measured per-tier errors")
        return lagrangian(scores, costs, budget_bytes, allowed, forced, errors.detach().cpu())
    return waterfall(scores, costs, budget_bytes, allowed, forced)


def waterfall_counts(
    num_tokens: int,
    costs: Sequence[int],
    budget_bytes: int,
    config: SpectrumConfig,
    forced: int | None = None,
    fp8_source: bool = False,
) -> list[tuple[Tier, int]]:
    """The ``paper`` waterfall when every token costs the same (``costs[tier]`` bytes,
    as when every layer holds every position): the tier of each rank bucket.

    With equal costs :func:`waterfall` depends on the scores only through the ranking
    (descending score, ties: earlier position first) of the non-forced tokens: the
    top ``n_0`` ranks get the highest tier, the next ``n_1`` the next one, ... and the
    rest is dropped. The bucket sizes follow from integers alone, so they are known
    on the host before the scores are (no device round trip), and
    :func:`tiers_from_ranks` applied to the scores gives exactly ``allocate_tiers``.

    Args:
        costs: bytes of one token at FP16, INT8, INT4 (DROP ignored).
        forced: tokens forced to FP16 at the start; default ``config.sinks`` for the
            methods that force sinks (``spectrum``, ``snapkv``), else 0.
        fp8_source: the KV is FP8 (see :func:`allowed_tiers`).

    Returns:
        ``[(tier, count), ...]`` for the non-forced tokens in rank order, the last
        bucket :attr:`Tier.DROP`; the forced tokens come first in the tier map.
    """
    if config.method == "pdtrim" or (config.method == "spectrum" and config.allocator != "paper"):
        raise SpectrumConfigError(f"no rank waterfall for {config.method}/{config.allocator}")
    if forced is None:
        forced = config.sinks if config.method in ("spectrum", "snapkv") else 0
    forced = min(int(forced), num_tokens)
    allowed = allowed_tiers(config, fp8_source)
    money = budget_bytes - forced * costs[Tier.FP16]
    if money < 0:
        raise SpectrumConfigError(
            f"budget of {budget_bytes} bytes cannot hold the {forced} attention-sink"
            f" tokens at FP16 ({budget_bytes - money} bytes): raise the budget or lower `sinks`"
        )
    rest = num_tokens - forced
    base = allowed[-1]
    kept = min(rest, money // costs[base]) if money > 0 else 0
    money -= kept * costs[base]
    tops = [kept]  # tops[i]: ranks at allowed[-1 - i] or higher
    for lower, upper in zip(allowed[:0:-1], allowed[-2::-1]):
        delta = costs[upper] - costs[lower]
        up = min(tops[-1], money // delta) if money > 0 else 0
        money -= up * delta
        tops.append(up)
    buckets = []
    higher = 0
    for tier, top in zip(allowed, reversed(tops)):
        buckets.append((tier, top - higher))
        higher = top
    buckets.append((Tier.DROP, rest - kept))
    return buckets


_RANK_TIERS: dict[tuple, torch.Tensor] = {}


def _rank_tiers(n: int, buckets: tuple, device: torch.device) -> torch.Tensor:
    """uint8 ``[n]``: the tier of each rank (``buckets`` in rank order), cached per
    (n, buckets, device): the request path builds it once per size, not per request."""
    key = (n, buckets, str(device))
    hit = _RANK_TIERS.get(key)
    if hit is None:
        rank = torch.arange(n)
        by_rank = torch.full((n,), int(buckets[0][0]), dtype=torch.uint8)
        edge = 0
        for (_, count), (tier, _) in zip(buckets[:-1], buckets[1:]):
            edge += count
            by_rank = torch.where(rank >= edge, int(tier), by_rank).to(torch.uint8)
        hit = by_rank.to(device)
        if len(_RANK_TIERS) >= 64:
            _RANK_TIERS.clear()
        _RANK_TIERS[key] = hit
    return hit


def tiers_from_ranks(
    scores: torch.Tensor, forced: int, buckets: Sequence[tuple[Tier, int]]
) -> torch.Tensor:
    """uint8 ``[T]`` tier map on ``scores.device`` from :func:`waterfall_counts`:
    the first ``forced`` tokens FP16, the others by descending score (stable)."""
    num_tokens = scores.numel()
    device = scores.device
    tiers = torch.empty(num_tokens, dtype=torch.uint8, device=device)
    tiers[:forced] = int(Tier.FP16)
    if forced < num_tokens:
        order = torch.argsort(scores[forced:], descending=True, stable=True) + forced
        by_rank = _rank_tiers(num_tokens - forced, tuple(buckets), device)
        tiers[order] = by_rank
    return tiers
