"""The bandwidth-adaptive budget rule (``--spectrum-budget auto``) on link regimes
measured on the H200 (Mooncake TCP loopback ~1.6 GB/s, intra-node NVLink) and the
estimators it learns from."""

from __future__ import annotations

import pytest

from sglang_spectrum.sglang_plugin import adaptive
from sglang_spectrum.sglang_plugin.adaptive import (
    AdaptiveBudget,
    Estimates,
    budget_grid,
    choose_budget,
    exposed_s,
)

GB = 1e9
# a 16k-token Llama-3-8B prompt: 128 KiB of 16-bit KV per token
FULL = 16384 * 131072
CODEC = 1 / (500 * GB)  # pack at b<1, seconds per 16-bit byte (~4 ms for 2 GB)
COPY = 1 / (4000 * GB)  # a plain gather
COMPUTE_S = 0.48  # the prompt's prefill compute


def est(rate_gbps: float | None, queued: float = 0.0) -> Estimates:
    rate = None if rate_gbps is None else rate_gbps * GB / 8
    return Estimates(rate, queued, CODEC, COPY)


def test_grid_spans_min_to_lossless():
    assert budget_grid(0.3)[0] == 0.3 and budget_grid(0.3)[-1] == 1.0
    assert budget_grid(1.0) == [1.0]
    assert all(round(b - a, 4) == 0.05 for a, b in zip(budget_grid(0.3), budget_grid(0.3)[1:]))


def test_slow_link_compresses_fast_link_goes_lossless():
    tcp = choose_budget(FULL, est(13), 0.3, request_s=COMPUTE_S)
    nvlink = choose_budget(FULL, est(800), 0.3, request_s=COMPUTE_S)
    assert tcp == 0.3
    assert nvlink == 1.0
    # and the lossless choice costs at most 5 % of the TTFT against the fastest
    gap = exposed_s(1.0, FULL, est(800)) - exposed_s(0.3, FULL, est(800))
    assert gap <= 0.05 * (COMPUTE_S + exposed_s(0.3, FULL, est(800)))


def test_intermediate_link_picks_an_intermediate_budget_for_hidden_parts():
    # an earlier part hides behind the next chunk's compute: the largest budget that hides
    # with HIDE_MARGIN of the window (estimates are noisy; an overrun delays the request)
    part = 8192 * 131072
    b = choose_budget(part, est(50), 0.3, hide_s=0.12)
    assert 0.3 < b < 1.0
    window = adaptive.HIDE_MARGIN * 0.12
    assert exposed_s(b, part, est(50)) <= window < exposed_s(round(b + 0.05, 4), part, est(50))


def test_queue_ahead_and_slo():
    part = 8192 * 131072
    free = choose_budget(part, est(100), 0.3, request_s=0.3)
    busy = choose_budget(part, est(100, queued=4 * part), 0.3, request_s=0.3)
    assert busy <= free
    # an SLO that only a small budget meets
    assert choose_budget(FULL, est(13), 0.3, slo_left_s=0.45) == 0.3
    # an SLO everything meets: the largest budget
    assert choose_budget(FULL, est(800), 0.3, slo_left_s=5.0) == 1.0


def test_first_part_without_a_rate_goes_at_the_minimum():
    assert choose_budget(FULL, est(None), 0.35) == 0.35


def test_estimators_learn_from_observations():
    a = AdaptiveBudget(min_budget=0.3)
    peer = ("decode-0",)
    assert a.rate(peer) is None
    a.observe_write(peer, 1 << 10, 1e-3)  # too small to be a rate sample
    assert a.rate(peer) is None
    for _ in range(20):
        a.observe_write(peer, 100 << 20, (100 << 20) / (1.6 * GB))
        a.observe_pack(0.3, FULL, FULL * CODEC)
        a.observe_pack(1.0, FULL, FULL * COPY)
        a.observe_compute(8192, 0.24)
    assert a.rate(peer) == pytest.approx(1.6 * GB, rel=1e-6)
    assert a.choose(peer, FULL, 0.0, 0, 0.0, request_tokens=16384) == 0.3
    fast = ("decode-nvlink",)
    for _ in range(20):
        a.observe_write(fast, 100 << 20, (100 << 20) / (100 * GB))
    assert a.choose(fast, FULL, 0.0, 0, 0.0, request_tokens=16384) == 1.0


def _serve(a: AdaptiveBudget, peer: tuple, parts: int, rate_Bps: float) -> list[float]:
    """``parts`` 8k-token parts through ``a`` as the prefill's workers would report them
    (pack cost at the measured GPU rates, writes at ``rate_Bps``); the chosen budgets."""
    part, chosen = 8192 * 131072, []
    for _ in range(parts):
        b = a.choose(peer, part, 0.0, 8192, 0.1, request_tokens=16384)
        a.observe_pack(b, part, part * (COPY if b >= 1.0 else CODEC))
        a.observe_write(peer, int(b * part), b * part / rate_Bps)
        a.observe_compute(8192, 0.25)
        chosen.append(b)
    return chosen


def test_a_slow_small_warm_up_pack_does_not_lock_in_lossless():
    """H200 run of 2026-12-03: after the benchmark's short warm-up request, every part on
    Mooncake TCP (~10 Gb/s) went at b=1.0 (the warm-up's fixed pack cost read as a huge
    per-byte cost, and the codec was never measured again)."""
    a = AdaptiveBudget(min_budget=0.3)
    peer = ("decode-tcp",)
    small = 12 * 131072  # a 12-token warm-up prompt; its pack: launches and host work
    a.choose(peer, small, 0.0, 0, 0.0, request_tokens=12)
    a.observe_pack(0.3, small, 0.05)
    a.observe_write(peer, int(0.3 * small), 0.002)
    assert _serve(a, peer, 6, 1.25 * GB) == [0.3] * 6


def test_a_bad_codec_sample_is_clipped_and_then_re_measured():
    a = AdaptiveBudget(min_budget=0.3)
    peer = ("decode-tcp",)
    part = 8192 * 131072
    a.observe_write(peer, 100 << 20, (100 << 20) / (1.25 * GB))
    a.observe_pack(0.3, part, 3.0)  # a JIT compile inside the first big pack
    chosen = _serve(a, peer, 12, 1.25 * GB)
    assert chosen[0] == 1.0  # the codec looks dear: lossless for now
    assert 0.3 in chosen[: adaptive.EXPLORE_EVERY + 2]  # re-measured within a few parts
    assert chosen[-3:] == [0.3] * 3  # and compressed from then on
    # an outlier after good samples moves the estimate at most OUTLIER_FACTOR-fold
    a.observe_pack(0.3, part, 100.0)
    assert _serve(a, peer, 1, 1.25 * GB) == [0.3]


def test_writes_beside_the_next_chunk_have_their_own_rate():
    """H200, 2026-12-04 (bench/results/serving_gpu_h200_arena_fix_tcp.json, 16k C=1): the
    first part's write, beside the second chunk's forward, took 588 ms and the last part's
    216 ms for the same 307 MiB (~4.4 vs ~12 Gb/s). One rate for both made the first part
    look hideable after each fast last part: auto sent it at ~0.41 and its write delayed
    the last part (TTFT 1122 ms vs 1046 ms at b=0.3). Kept apart, the first part goes at
    what actually hides (nothing here: the minimum) and the last part sees the idle link."""
    a = AdaptiveBudget(min_budget=0.3)
    peer = ("decode-tcp",)
    part = 8192 * 131072
    beside, idle = 4.4 * GB / 8, 12 * GB / 8
    a.observe_pack(0.3, part, part * CODEC)
    a.observe_pack(1.0, part, part * COPY)
    first, last = [], []
    for _ in range(10):
        b1 = a.choose(peer, part, 0.0, 8192, 0.25, request_tokens=16384)
        a.observe_write(peer, int(b1 * part), b1 * part / beside, overlapped=True)
        a.observe_compute(8192, 0.40)
        b2 = a.choose(peer, part, 0.0, 0, 0.65, request_tokens=16384)
        a.observe_write(peer, int(b2 * part), b2 * part / idle)
        first.append(b1)
        last.append(b2)
    assert a.rate(peer, overlapped=True) == pytest.approx(beside)
    assert a.rate(peer) == pytest.approx(idle)
    assert first[2:] == [0.3] * 8  # 0.3 already takes 0.59 s > the ~0.4 s to hide behind
    assert set(last[2:]) <= {0.3, 0.35}  # the last part: within 5 % of the TTFT
    # a peer with only idle samples so far lends them to the overlapped regime
    other = ("decode-2",)
    a.observe_write(other, 100 << 20, (100 << 20) / idle)
    assert a.rate(other, overlapped=True) == pytest.approx(idle)
