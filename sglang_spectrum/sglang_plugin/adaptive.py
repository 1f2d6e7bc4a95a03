"""Bandwidth-adaptive budget (``--spectrum-budget auto``), SGLang-free.

Compression pays only when the link is the bottleneck: on a fast link a fixed
b=0.5 loses quality for nothing and its pack/unpack cost can make the transfer
slower. With ``auto`` the prefill picks a budget per part (one per prefill chunk)
from three online estimates:

* the **link rate** of each decode peer: an exponentially weighted mean of
  bytes/s of its completed writes (:class:`Ewma`), kept apart for writes that
  overlap the prefill's next chunk (earlier parts) and writes after the last chunk
  (H200, Mooncake TCP loopback, 16k tokens: 588 ms against 216 ms for the same
  307 MiB, ~4.4 against ~12 Gb/s), and the bytes queued ahead of this part on that
  peer's pipeline;
* the **codec cost**: seconds per 16-bit byte to pack (and, symmetric, unpack) at
  b < 1 and at b = 1 (a plain gather), measured from this server's packs; none at
  b = 1 when the part would be written page to page (``--spectrum-direct``);
* the **prefill compute** still to come: seconds per prompt token between the
  chunks of a request (from the scheduler's part submissions).

The rule (:func:`choose_budget`), over the grid ``min_budget, ..., 1.0`` in steps
of :data:`BUDGET_STEP`, for a part of ``F`` 16-bit bytes::

    exposed(b) = (queued + b * F) / rate + F * cost(b) * 2      # wire + pack + unpack

* an earlier part hides behind the chunks still to compute (``hide_s``): the
  largest ``b`` with ``exposed(b) <= HIDE_MARGIN * hide_s`` (a part that overruns its
  window delays the whole request by the overrun, while one that hides with room to
  spare costs a little quality: on the H200 at 16k tokens a first part sent at
  ~b=1.0 to hide behind the second chunk's ~0.3 s made the TTFT 1.11x the fixed
  b=0.3's);
* otherwise (the last part, or nothing small enough hides), with
  ``--spectrum-ttft-slo-ms``: the largest ``b`` that still meets the SLO
  (``elapsed + exposed(b) <= slo``), else the fastest;
* without an SLO: the largest ``b`` whose ``exposed(b)`` exceeds the fastest
  one's by at most :data:`TOLERANCE` of the request's time to first token
  (its prefill compute + the fastest exposed time): quality is never bought
  with more than 5 % of the TTFT, and the part goes lossless (b = 1.0) when the
  link is fast enough that compression gains less than that.

Before a peer's first write there is no rate: the first part goes at
``min_budget`` (safe for the TTFT), the next ones adapt.

The codec cost is learnt only from the path that runs, so one bad sample of the
compressed path (a small warm-up request whose fixed host cost looks like a huge
per-byte cost, a JIT compile) would make ``b = 1.0`` look cheaper forever and the
compressed path would never be measured again. Hence: packs smaller than
:data:`MIN_PACK_SAMPLE_BYTES` are not samples, a sample counts at most
:data:`OUTLIER_FACTOR` x the current estimate (one that many times lower replaces
it), and while the codec looks more
than :data:`OUTLIER_FACTOR` x dearer than a plain gather (on a GPU it is ~1.3x),
every :data:`EXPLORE_EVERY`-th part that went lossless only because of the codec
cost (the wire alone would have compressed) takes the wire-only choice, so the
codec is measured again (not when the lossless part is written directly: its cost
is the wire's alone, and on the H200's NVLink the explored parts made 4k requests
pack and unpack for nothing).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

BUDGET_STEP = 0.05
TOLERANCE = 0.05  # of the request's TTFT that quality may cost
HIDE_MARGIN = 0.8  # of the compute still to come that an earlier part's transfer may fill
MIN_RATE_BYTES = 256 << 10  # writes smaller than this are latency-bound: not a rate sample
MIN_PACK_SAMPLE_BYTES = 32 << 20  # 16-bit bytes; below it a pack's fixed host cost dominates
OUTLIER_FACTOR = 4.0  # a cost sample counts at most this many times the current estimate
EXPLORE_EVERY = 8  # lossless parts chosen for a suspect codec cost before re-measuring it


class Ewma:
    """Exponentially weighted mean (``alpha`` = weight of a new sample); None until the
    first sample."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x

    def add_clipped(self, x: float, factor: float = OUTLIER_FACTOR) -> None:
        """Add a cost sample ``x``: counted at most ``factor`` x the current value (a JIT
        compile or a preempted thread must not swing the estimate; a real rise still
        moves it), and taken as the new value when it is ``factor`` x lower (nothing
        runs faster than it can: the old value was the outlier)."""
        if self.value is not None and x * factor < self.value:
            self.value = x
        else:
            self.add(x if self.value is None else min(x, factor * self.value))


def budget_grid(min_budget: float, step: float = BUDGET_STEP) -> list[float]:
    """``min_budget, ..., 1.0`` in steps of ``step`` (ascending, 1.0 included)."""
    n = max(0, int(round((1.0 - min_budget) / step)))
    grid = sorted({round(min(1.0, min_budget + i * step), 4) for i in range(n + 1)} | {1.0})
    return [b for b in grid if b >= min_budget]


@dataclass(frozen=True)
class Estimates:
    """What :func:`choose_budget` knows about a part's path (seconds, bytes)."""

    rate_Bps: float | None  # the peer's write rate
    queued_bytes: float  # bytes ahead of this part on the peer's pipeline
    codec_s_per_byte: float  # pack cost at b < 1, per 16-bit byte
    copy_s_per_byte: float  # pack cost at b = 1 (a gather), per 16-bit byte


def exposed_s(b: float, full_bytes: float, est: Estimates) -> float:
    """Seconds to pack, write and unpack a part of ``full_bytes`` at budget ``b``."""
    cost = est.copy_s_per_byte if b >= 1.0 else est.codec_s_per_byte
    return (est.queued_bytes + b * full_bytes) / est.rate_Bps + 2 * full_bytes * cost


def choose_budget(
    full_bytes: float,
    est: Estimates,
    min_budget: float,
    hide_s: float = 0.0,
    slo_left_s: float | None = None,
    request_s: float = 0.0,
) -> float:
    """The budget of one part (see the module docstring). ``hide_s``: compute time
    still to come after this part (0 for the last part); ``slo_left_s``: what is left
    of the TTFT SLO (None: no SLO); ``request_s``: the request's prefill compute time."""
    grid = budget_grid(min_budget)
    if est.rate_Bps is None or est.rate_Bps <= 0:
        return grid[0]
    times = {b: exposed_s(b, full_bytes, est) for b in grid}
    if hide_s > 0:
        hidden = [b for b in grid if times[b] <= HIDE_MARGIN * hide_s]
        if hidden:
            return hidden[-1]
    fastest = min(times.values())
    if slo_left_s is not None:
        meets = [b for b in grid if times[b] <= slo_left_s]
        return meets[-1] if meets else min(grid, key=times.__getitem__)
    # 5 % of the TTFT this part adds to the prompt's compute (the queue ahead is not
    # this part's to shorten: it must not widen the slack)
    slack = TOLERANCE * (request_s + fastest - est.queued_bytes / est.rate_Bps)
    return [b for b in grid if times[b] <= fastest + slack][-1]


class AdaptiveBudget:
    """The estimates of one prefill rank (thread-safe) and the per-part choice."""

    def __init__(self, min_budget: float, slo_ms: float = 0.0):
        self.min_budget = float(min_budget)
        self.slo_s = float(slo_ms) / 1e3 if slo_ms else None
        self._lock = threading.Lock()
        self._rates: dict[tuple, Ewma] = {}  # (peer, overlapped) -> bytes/s
        self._codec = Ewma()
        self._copy = Ewma()
        self._compute = Ewma()  # seconds per prompt token of prefill compute
        self._lossless_for_codec = 0  # parts in a row lossless only for the codec cost

    def observe_write(
        self, peer: tuple, nbytes: int, seconds: float, overlapped: bool = False
    ) -> None:
        """A completed write to ``peer``; ``overlapped``: an earlier part's, written while
        the prefill computed its next chunk."""
        if nbytes < MIN_RATE_BYTES or seconds <= 0:
            return
        with self._lock:
            self._rates.setdefault((peer, overlapped), Ewma()).add(nbytes / seconds)

    def observe_pack(self, budget: float, full_bytes: int, seconds: float) -> None:
        if full_bytes < MIN_PACK_SAMPLE_BYTES or seconds <= 0:
            return
        with self._lock:
            if budget < 1.0:
                self._lossless_for_codec = 0
            (self._copy if budget >= 1.0 else self._codec).add_clipped(seconds / full_bytes)

    def observe_compute(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._compute.add(seconds / tokens)

    def rate(self, peer: tuple, overlapped: bool = False) -> float | None:
        """The write rate to ``peer`` in that regime (the other one's until it has a
        sample; None before any)."""
        with self._lock:
            e = self._rates.get((peer, overlapped)) or self._rates.get((peer, not overlapped))
            return None if e is None else e.value

    def choose(
        self,
        peer: tuple,
        full_bytes: int,
        queued_bytes: float,
        tokens_to_compute: int,
        elapsed_s: float,
        request_tokens: int = 0,
        direct: bool = False,
    ) -> float:
        """Budget of a part of ``full_bytes`` to ``peer``; ``tokens_to_compute``: prompt
        tokens the prefill still computes after this part; ``elapsed_s``: since the
        request arrived (for the SLO); ``request_tokens``: the whole prompt's;
        ``direct``: a lossless part would be written page to page (no codec cost)."""
        rate = self.rate(peer, overlapped=tokens_to_compute > 0)
        with self._lock:
            codec, copy, compute = self._codec.value, self._copy.value, self._compute.value
        est = Estimates(
            rate_Bps=rate,
            queued_bytes=queued_bytes,
            codec_s_per_byte=codec or 0.0,
            copy_s_per_byte=0.0 if direct else copy if copy is not None else (codec or 0.0) / 4,
        )
        per_token = compute or 0.0
        slo_left = None if self.slo_s is None else self.slo_s - elapsed_s
        hide_s, request_s = tokens_to_compute * per_token, request_tokens * per_token
        args = (self.min_budget, hide_s, slo_left, request_s)
        chosen = choose_budget(full_bytes, est, *args)
        # (a direct lossless part has no codec to compare with: nothing to re-measure)
        suspect = not direct and est.codec_s_per_byte > OUTLIER_FACTOR * est.copy_s_per_byte
        if chosen < 1.0 or full_bytes < MIN_PACK_SAMPLE_BYTES or not suspect:
            return chosen
        wire_only = choose_budget(full_bytes, replace(est, codec_s_per_byte=0.0), *args)
        if wire_only >= 1.0:
            return chosen  # lossless for the wire's sake: nothing to re-measure
        with self._lock:
            self._lossless_for_codec += 1
            explore = self._lossless_for_codec >= EXPLORE_EVERY
            if explore:
                self._lossless_for_codec = 0
        return wire_only if explore else chosen
