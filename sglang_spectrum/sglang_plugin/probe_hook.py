"""The tier mode in force in this server process (``--spectrum-tiers auto|3|2``).

``auto`` is resolved by the INT4-tolerance probe at scheduler startup
(:func:`run_startup_probe`, called once in each prefill scheduler process by
an AFTER hook on ``Scheduler.__init__`` registered through SGLang's plugin
``HookRegistry``, before the scheduler serves its first request); until a
decision exists, and whenever the probe cannot run, the safe 2-tier mode
(FP16+INT8) is used.

The probe is :func:`sglang_spectrum.eval.probe.run_probe` on the served model
through SGLang's own model runner (:mod:`.sglang_engine`), its result cached by
:func:`~sglang_spectrum.eval.probe.cached_probe` under
``<cache>/probe/sglang-<kv dtype>/`` keyed by the weights identity, the probe
settings and the policy version (``--spectrum-probe-refresh`` re-runs it).

Environment (all optional):

* ``SGLANG_SPECTRUM_PROBE_BUDGET``: the probe's budget (default 0.3). Lower it
  to force a failing probe (e.g. in tests); it is part of the cache key.
* ``SGLANG_SPECTRUM_PROBE_CONTEXT``: the probe's haystack length in tokens
  (default 2048; shrunk to fit ``--context-length`` and the KV pool).
* ``SGLANG_SPECTRUM_PROBE_CACHE_DIR``: where decisions are cached (default
  ``$SPECTRUM_CACHE_DIR/probe`` or ``~/.cache/sglang_spectrum/probe``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

BUDGET_ENV = "SGLANG_SPECTRUM_PROBE_BUDGET"
CONTEXT_ENV = "SGLANG_SPECTRUM_PROBE_CONTEXT"
CACHE_ENV = "SGLANG_SPECTRUM_PROBE_CACHE_DIR"
METRIC_PASS = "spectrumkv_probe_int4_pass"  # same prefix as .metrics
METRIC_TIERS = "spectrumkv_probe_tier_mode"

_lock = threading.Lock()
_decision: dict[str, Any] = {}
_gauges: dict[str, Any] = {}


def set_decision(tiers: str, evidence: dict[str, Any] | None = None) -> None:
    """Record the probe's decision ("3" or "2") for this process."""
    if tiers not in ("3", "2"):
        raise ValueError(f"tier decision must be '3' or '2', got {tiers!r}")
    with _lock:
        _decision.clear()
        _decision.update({"tiers": tiers, **(evidence or {})})


def decision() -> dict[str, Any]:
    """The recorded decision and its evidence (empty if none)."""
    with _lock:
        return dict(_decision)


def resolved_tiers(option: str) -> str:
    """The tiers to pack with: the option itself for "3"/"2", the probe's decision for "auto"."""
    if option in ("3", "2"):
        return option
    with _lock:
        return _decision.get("tiers", "2")


def bootstrap_fields(option: str) -> dict[str, Any]:
    """What the prefill tells decode at bootstrap about its tier mode (JSON-safe).

    ``tier_mode``: "3" or "2", the tiers actually packed; ``tier_source``:
    "option", "probe", "cache" or "fallback"; ``probe_int4_pass``: True/False,
    or None when no probe result exists (option given, or fallback).
    """
    d = decision()
    source = "option" if option in ("3", "2") else d.get("source", "none")
    return {
        "tier_mode": resolved_tiers(option),
        "tier_source": source,
        "probe_int4_pass": d.get("passed") if source in ("probe", "cache") else None,
    }


# --------------------------------------------------------------------------- startup probe


class ProbeUnavailable(RuntimeError):
    """The probe cannot run on this server (the message says why)."""


def probe_settings(allocator: str, capacity: int | None = None, codec: Any = None):
    """The :class:`ProbeSettings` for this server: defaults, env overrides, and a
    context shrunk (halved) until prompt + answer fit ``capacity`` tokens.

    ``codec``: the server's options; its ``rotation`` / ``group_size`` /
    ``key_scales`` are what the trials must pack with too.
    """
    from sglang_spectrum.eval.probe import ProbeSettings

    base = ProbeSettings()
    budget = float(os.environ.get(BUDGET_ENV) or base.budget)
    if not 0.0 < budget <= 1.0:
        raise ProbeUnavailable(f"{BUDGET_ENV}={budget} is not in (0, 1]")
    context = int(os.environ.get(CONTEXT_ENV) or base.context)
    wanted = context
    if capacity is not None:
        while context + base.max_new_tokens > capacity and context // 2 >= base.min_context:
            context //= 2
        if context + base.max_new_tokens > capacity:
            raise ProbeUnavailable(
                f"the probe needs {min(wanted, base.min_context) + base.max_new_tokens} tokens"
                f" for one request, the server has room for {capacity}"
                " (--context-length / --max-total-tokens too small)"
            )
    return ProbeSettings(
        budget=budget,
        context=context,
        min_context=min(base.min_context, context),
        allocator=allocator,
        rotation=getattr(codec, "rotation", base.rotation),
        group_size=getattr(codec, "group_size", base.group_size),
        key_scales=getattr(codec, "key_scales", base.key_scales),
    )


def probe_cache_dir(kv_dtype: str) -> str:
    from sglang_spectrum.eval.probe import probe_cache_dir as default_dir

    root = os.environ.get(CACHE_ENV) or str(default_dir())
    return os.path.join(root, f"sglang-{kv_dtype}")


def _probe(scheduler: Any, opts: Any):
    """Run (or read) the probe; returns (ProbeResult, settings, lookup seconds)."""
    from sglang_spectrum.eval.probe import cached_probe, read_cached_probe, run_probe
    from sglang_spectrum.models import weights_identity

    from . import compat
    from .sglang_engine import (
        SGLangProbeEngine,
        kv_dtype_name,
        model_path_of,
        model_runner_of,
        probe_capacity,
        tokenizer_of,
    )

    model_runner = model_runner_of(scheduler)
    cache_dir = probe_cache_dir(kv_dtype_name(model_runner))  # also checks the pool
    settings = probe_settings(opts.allocator, probe_capacity(model_runner), opts)
    weights_id = weights_identity(model_path_of(model_runner))

    engines = []

    def run():
        tokenizer = tokenizer_of(scheduler, model_runner)
        engine = SGLangProbeEngine(model_runner, tokenizer, settings.max_new_tokens)
        engines.append(engine)
        return run_probe(engine, tokenizer, settings)

    t0 = time.perf_counter()
    refresh = bool(getattr(opts, "probe_refresh", False))

    result = coordinated(
        compat.tp_cpu_group(scheduler),
        lookup=lambda: None if refresh else read_cached_probe(weights_id, settings, cache_dir),
        run=lambda: cached_probe(weights_id, run, settings, refresh=True, cache_dir=cache_dir),
    )
    if engines:
        e = engines[0]
        logger.info(
            "SpectrumKV: probe run: %d forwards, extend %.1f s, decode %.1f s, pack+unpack"
            " %.1f s, last 3-tier tier counts %s",
            e.forwards,
            e.seconds["extend"],
            e.seconds["decode"],
            e.seconds["codec"],
            e.last_tier_counts,
        )
    return result, settings, time.perf_counter() - t0


def coordinated(group: Any, lookup: Any, run: Any) -> Any:
    """The probe result every rank of ``group`` (a CPU process group over the TP
    ranks, or None for one rank) agrees on.

    Rank 0 alone reads the cache (``lookup() -> result | None``) and broadcasts it,
    so a cache on rank 0's node only (or a stale one elsewhere) cannot split the
    ranks. On a miss every rank runs ``run()`` (the trials' forwards need all TP
    ranks; each stores its node's cache); the ranks then exchange their outcome:
    if any rank raised, every rank raises the same error (and falls back alike),
    else every rank takes rank 0's result.
    """
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        cached = lookup()
        return cached if cached is not None else run()
    rank = dist.get_rank(group)
    src = dist.get_global_rank(group, 0)
    box = [lookup() if rank == 0 else None]
    dist.broadcast_object_list(box, src=src, group=group)
    if box[0] is not None:
        return box[0]
    try:
        result, error = run(), ""
    except Exception as e:
        result, error = None, f"{type(e).__name__}: {e}"
    outcomes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, (error, result), group=group)
    for r, (err, _) in enumerate(outcomes):
        if err:
            raise RuntimeError(f"the probe failed on TP rank {r}: {err}")
    return outcomes[0][1]


def _fallback(server_args: Any, reason: str, seconds: float) -> dict[str, Any]:
    logger.warning(
        "SpectrumKV: INT4 probe could not run, falling back to --spectrum-tiers 2 (%s)", reason
    )
    set_decision("2", {"source": "fallback", "passed": None, "reason": reason, "seconds": seconds})
    _publish(server_args, "2", None, "fallback")
    return decision()


def run_startup_probe(scheduler: Any, server_args: Any, options: Any = None) -> dict[str, Any]:
    """Resolve ``--spectrum-tiers`` for this prefill scheduler process; never raises.

    Called once per prefill scheduler (every TP rank) at the end of
    ``Scheduler.__init__`` with the server's :class:`~.options.SpectrumServerOptions`
    (``None``: read from ``server_args``). ``3``/``2``: recorded as given.
    ``auto``: the probe (or its cached result) decides; a probe that cannot run
    logs one WARNING and falls back to "2". Returns :func:`decision`: at least
    ``tiers`` ("3"|"2"), ``passed`` (True/False, None without a probe result)
    and ``source`` ("probe"|"cache"|"fallback"|"option").
    """
    t0 = time.perf_counter()
    try:
        opts = options
        if opts is None:  # this server's options (SGLANG_SPECTRUM_OPTIONS)
            from .options import current_options

            opts = current_options()
        tiers = str(opts.tiers)
    except Exception as e:
        return _fallback(server_args, f"{type(e).__name__}: {e}", time.perf_counter() - t0)

    if tiers in ("3", "2"):
        set_decision(tiers, {"source": "option", "passed": None})
        logger.info("SpectrumKV: --spectrum-tiers %s given, INT4 probe not run", tiers)
        _publish(server_args, tiers, None, "option")
        return decision()

    try:
        result, settings, lookup_s = _probe(scheduler, opts)
    except Exception as e:
        return _fallback(server_args, f"{type(e).__name__}: {e}", time.perf_counter() - t0)

    source = "cache" if result.cached else "probe"
    set_decision(
        result.decision,
        {
            "source": source,
            "passed": result.passed,
            "reason": result.reason,
            "context": result.context,
            "budget": settings.budget,
            "seconds": result.seconds,
            "lookup_seconds": lookup_s,
            "trials": result.trials,
        },
    )
    logger.info(
        "SpectrumKV: %s -> --spectrum-tiers auto resolved to %s (%s in %.2f s; budget %g,"
        " context %d)",
        result.summary(),
        result.decision,
        "read from cache" if result.cached else "probe run",
        lookup_s,
        settings.budget,
        result.context,
    )
    for i, t in enumerate(result.trials):
        logger.info(
            "SpectrumKV: probe trial %d: context %d depth %.2f needle %s | full %r (%s) |"
            " 3-tier %r (%s)",
            i,
            t["context"],
            t["depth"],
            t["needle"],
            t["full_answer"],
            "ok" if t["full_ok"] else "miss",
            t["degraded_answer"],
            "ok" if t["degraded_ok"] else ("miss" if t["degraded_answer"] is not None else "-"),
        )
    _publish(server_args, result.decision, result.passed, source)
    return decision()


# --------------------------------------------------------------------------- metrics


def _publish(server_args: Any, tiers: str, passed: bool | None, source: str) -> None:
    """Prometheus gauges (only with ``--enable-metrics``)."""
    try:
        from .compat import resolved_server_arg as server_arg

        if not server_arg(server_args, "enable_metrics", False):
            return
        from prometheus_client import Gauge

        labels = {
            "model_name": str(
                server_arg(server_args, "served_model_name")
                or server_arg(server_args, "model_path")
            ),
            "role": "prefill",
            "source": source,
        }
        if not _gauges:
            _gauges[METRIC_PASS] = Gauge(
                METRIC_PASS,
                "SpectrumKV INT4-tolerance probe: 1 pass, 0 fail, -1 not run (option/fallback).",
                labelnames=list(labels),
                multiprocess_mode="mostrecent",
            )
            _gauges[METRIC_TIERS] = Gauge(
                METRIC_TIERS,
                "SpectrumKV tier mode decided at startup: 3 (FP16+INT8+INT4) or 2 (FP16+INT8).",
                labelnames=list(labels),
                multiprocess_mode="mostrecent",
            )
        _gauges[METRIC_PASS].labels(**labels).set(-1 if passed is None else int(passed))
        _gauges[METRIC_TIERS].labels(**labels).set(int(tiers))
    except Exception as e:  # metrics are best effort
        logger.warning("SpectrumKV: probe metrics not published (%s)", e)
