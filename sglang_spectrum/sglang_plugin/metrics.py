"""Observability of the spectrum transfer backend: Prometheus metrics, per-request stats.

Prometheus (only with ``--enable-metrics``): SGLang runs ``prometheus_client``
in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set by the launcher
before the scheduler processes are spawned, ``utils/common.py:1316``; the
HTTP server's ``/metrics`` merges every process's files,
``utils/common.py:1334``). Metrics created here, in the scheduler process,
therefore appear on the server's ``/metrics`` next to SGLang's own:

=================================== ===========================================
``spectrumkv_sent_bytes_total``      packed bytes written over Mooncake (prefill)
``spectrumkv_received_bytes_total``  packed bytes received and unpacked (decode)
``spectrumkv_full_bytes_total``      16-bit size of the same requests' KV (both)
``spectrumkv_tokens_total``          prompt tokens per tier (label ``tier``)
``spectrumkv_requests_total``        requests per ``outcome`` (ok / failed)
``spectrumkv_pack_seconds``          histogram: gather + score + pack (prefill)
``spectrumkv_transfer_seconds``      histogram: the Mooncake writes (prefill)
``spectrumkv_chosen_budget``         histogram: the budget each request went at (prefill)
``spectrumkv_unpack_seconds``        histogram: validate + unpack after ``Sent`` (decode)
``spectrumkv_tier_mode``             gauge = 1 for the tier mode in use (label ``mode``)
``spectrumkv_budget``                gauge: the ``--spectrum-budget`` in use
``spectrumkv_state_entries``         gauge: per-request table sizes (label ``kind``)
=================================== ===========================================

Every metric has the label ``role`` (prefill | decode).

Per request: one DEBUG log line (logger ``sglang_spectrum.sglang_plugin.prefill_side``)
and, when ``SGLANG_SPECTRUM_STATS_FILE`` names a file, one JSON line appended
to it per request and side (what ``spectrumkv demo`` and the tests read).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

STATS_FILE_ENV = "SGLANG_SPECTRUM_STATS_FILE"
PREFIX = "spectrumkv"
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_lock = threading.Lock()
_instances: dict[str, SpectrumMetrics] = {}
_stats_lock = threading.Lock()


class SpectrumMetrics:
    """The Prometheus metrics of one side (created once per process and role)."""

    def __init__(self, role: str):
        # import after PROMETHEUS_MULTIPROC_DIR is set (we run in the scheduler process)
        from prometheus_client import Counter, Gauge, Histogram

        self.role = role
        labels = ["role"]
        self.sent_bytes = Counter(
            f"{PREFIX}_sent_bytes", "Packed KV bytes written over Mooncake.", labels
        )
        self.received_bytes = Counter(
            f"{PREFIX}_received_bytes", "Packed KV bytes received and unpacked.", labels
        )
        self.full_bytes = Counter(
            f"{PREFIX}_full_bytes",
            "16-bit (full precision) size of the KV of the same requests.",
            labels,
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens", "Prompt tokens per precision tier.", labels + ["tier"]
        )
        self.requests = Counter(f"{PREFIX}_requests", "Requests per outcome.", labels + ["outcome"])
        self.pack_seconds = Histogram(
            f"{PREFIX}_pack_seconds",
            "Gather + score + pack time per request.",
            labels,
            buckets=_TIME_BUCKETS,
        )
        self.transfer_seconds = Histogram(
            f"{PREFIX}_transfer_seconds",
            "Time of the one Mooncake write per request.",
            labels,
            buckets=_TIME_BUCKETS,
        )
        self.unpack_seconds = Histogram(
            f"{PREFIX}_unpack_seconds",
            "Validate + unpack time per request after its last write (parts unpacked as"
            " they landed are not counted: --spectrum-unpack arrival).",
            labels,
            buckets=_TIME_BUCKETS,
        )
        self.tier_mode = Gauge(
            f"{PREFIX}_tier_mode",
            "1 for the tier mode in use (3 = FP16+INT8+INT4, 2 = FP16+INT8).",
            labels + ["mode"],
            multiprocess_mode="livemax",
        )
        self.budget = Gauge(
            f"{PREFIX}_budget",
            "The --spectrum-budget in use.",
            labels,
            multiprocess_mode="livemax",
        )
        self.chosen_budget = Histogram(
            f"{PREFIX}_chosen_budget",
            "Budget a request was sent at (byte-weighted mean of its parts).",
            labels,
            buckets=tuple(round(0.25 + 0.05 * i, 2) for i in range(16)),
        )
        self.state = Gauge(
            f"{PREFIX}_state_entries",
            "Entries of the backend's per-request tables (rooms, receivers, SGLang's status"
            " table, ...), and arena bytes in use (kind=arena_in_use).",
            labels + ["kind"],
            multiprocess_mode="livesum",
        )

    def set_state(self, sizes: dict[str, int]) -> None:
        for kind, n in sizes.items():
            self.state.labels(role=self.role, kind=kind).set(n)

    def set_mode(self, tiers: str, budget: float) -> None:
        for mode in ("3", "2"):
            self.tier_mode.labels(role=self.role, mode=mode).set(1 if mode == tiers else 0)
        self.budget.labels(role=self.role).set(budget)

    def observe_sent(self, stats: dict[str, Any]) -> None:
        r = self.role
        self.sent_bytes.labels(role=r).inc(stats["sent_bytes"])
        self.full_bytes.labels(role=r).inc(stats["full_bytes"])
        for tier, n in stats.get("tiers", {}).items():
            self.tokens.labels(role=r, tier=tier).inc(n)
        self.pack_seconds.labels(role=r).observe(stats["pack_ms"] / 1e3)
        self.transfer_seconds.labels(role=r).observe(stats["transfer_ms"] / 1e3)
        self.chosen_budget.labels(role=r).observe(stats["chosen_budget_mean"])
        self.requests.labels(role=r, outcome="ok").inc()

    def observe_received(self, stats: dict[str, Any]) -> None:
        r = self.role
        self.received_bytes.labels(role=r).inc(stats["received_bytes"])
        self.full_bytes.labels(role=r).inc(stats["full_bytes"])
        for tier, n in stats.get("tiers", {}).items():
            self.tokens.labels(role=r, tier=tier).inc(n)
        self.unpack_seconds.labels(role=r).observe(stats["unpack_ms"] / 1e3)
        self.requests.labels(role=r, outcome="ok").inc()

    def observe_failure(self) -> None:
        self.requests.labels(role=self.role, outcome="failed").inc()


def get_metrics(server_args: Any, role: str) -> SpectrumMetrics | None:
    """The metrics of this process and role, or None without ``--enable-metrics``."""
    if not getattr(server_args, "enable_metrics", False):
        return None
    with _lock:
        m = _instances.get(role)
        if m is None:
            try:
                m = _instances[role] = SpectrumMetrics(role)
            except Exception as e:  # never break serving because of metrics
                logger.warning("SpectrumKV: Prometheus metrics disabled (%s)", e)
                return None
        return m


def unix_ms(perf_t: float) -> float:
    """A ``time.perf_counter()`` reading as Unix epoch ms: what lines the two servers' stats
    up on one request's timeline (same host: the same clock)."""
    return round((time.time() - time.perf_counter() + perf_t) * 1e3, 1)


def since_ms(t0: float, t: float | None) -> float | None:
    """ms from perf_counter ``t0`` to ``t`` (None: ``t`` never happened)."""
    return None if not t else round((t - t0) * 1e3, 3)


def write_stats(record: dict[str, Any]) -> None:
    """Append one JSON line to ``$SGLANG_SPECTRUM_STATS_FILE`` (if set); never raises."""
    path = os.environ.get(STATS_FILE_ENV)
    if not path:
        return
    line = json.dumps(record, sort_keys=True) + "\n"
    try:
        with _stats_lock, open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as e:
        logger.warning("SpectrumKV: cannot write stats to %s: %s", path, e)


def read_stats(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a stats file (both sides), in write order."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def parse_prometheus(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
