"""The INT4-tolerance probe at prefill scheduler startup (``--spectrum-tiers auto``).

Fast tests: the decision store, the probe's settings (env overrides, context
shrinking), the option and exception paths of ``run_startup_probe`` and the
Prometheus gauges.

In-process tests (``slow``: real SGLang, real SmolLM2-135M, no server): a
``ModelRunner`` is built on the CPU the way ``sglang.benchmark.one_batch``
builds it (from the same CLI flags a server gets), and ``run_startup_probe``
runs on it, with the scheduler reduced to the two attributes it reads
(``tp_worker.model_runner`` and ``tokenizer``):

* the engine itself: greedy answers, a lossless (b=1.0) round trip through
  ``transfer.pack_request``/``unpack_request`` that leaves the pool KV
  bit-identical, INT4 tokens at b=0.3, no slot leaked;
* the probe on a 512-token haystack: a cached decision is read as is,
  ``probe_refresh`` ignores it and runs the probe (PASS -> tiers 3), the next
  start reads the new decision in milliseconds;
* the fallback when the KV pool has no room for the probe (one WARNING,
  tiers 2, nothing cached).

Slow tests further down start real servers (prefill alone or a PD deployment).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    # The in-process ModelRunner runs on SGLang's CPU engine, which SGLang's modules
    # choose when they are imported: set before anything imports them.
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

from sglang_spectrum.sglang_plugin import probe_hook  # noqa: E402
from sglang_spectrum.sglang_plugin.options import SpectrumServerOptions  # noqa: E402

# --------------------------------------------------------------------------- fast


@pytest.fixture(autouse=True)
def _clean_decision(monkeypatch):
    for env in (probe_hook.BUDGET_ENV, probe_hook.CONTEXT_ENV, probe_hook.CACHE_ENV):
        monkeypatch.delenv(env, raising=False)
    with probe_hook._lock:
        probe_hook._decision.clear()
    yield
    with probe_hook._lock:
        probe_hook._decision.clear()


def _server_args(model_path="unused", **kw) -> SimpleNamespace:
    base = dict(model_path=str(model_path), served_model_name="m", enable_metrics=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_decision_store_and_bootstrap_fields():
    assert probe_hook.resolved_tiers("auto") == "2"  # no decision yet: safe mode
    assert probe_hook.resolved_tiers("3") == "3"
    probe_hook.set_decision("3", {"source": "probe", "passed": True})
    assert probe_hook.resolved_tiers("auto") == "3"
    assert probe_hook.resolved_tiers("2") == "2"
    assert probe_hook.bootstrap_fields("auto") == {
        "tier_mode": "3",
        "tier_source": "probe",
        "probe_int4_pass": True,
    }
    assert probe_hook.bootstrap_fields("2")["tier_source"] == "option"
    with pytest.raises(ValueError):
        probe_hook.set_decision("4")


def test_probe_settings_env_and_shrink(monkeypatch):
    s = probe_hook.probe_settings("optimal")
    assert (s.budget, s.context, s.allocator) == (0.3, 2048, "optimal")
    monkeypatch.setenv(probe_hook.BUDGET_ENV, "0.05")
    monkeypatch.setenv(probe_hook.CONTEXT_ENV, "4096")
    s = probe_hook.probe_settings("paper", capacity=4096 + 10)
    assert (s.budget, s.context) == (0.05, 4096)
    s = probe_hook.probe_settings("paper", capacity=1500)  # 4096 -> 2048 -> 1024
    assert s.context == 1024 and s.context + s.max_new_tokens <= 1500
    assert s.min_context <= s.context
    with pytest.raises(probe_hook.ProbeUnavailable, match="room for 300"):
        probe_hook.probe_settings("paper", capacity=300)
    monkeypatch.setenv(probe_hook.BUDGET_ENV, "1.5")
    with pytest.raises(probe_hook.ProbeUnavailable):
        probe_hook.probe_settings("paper")


def test_probe_settings_follow_the_codec_options():
    opts = SpectrumServerOptions(rotation="hadamard", group_size=32, key_scales="channel")
    s = probe_hook.probe_settings("paper", None, opts)
    assert (s.rotation, s.group_size, s.key_scales) == ("hadamard", 32, "channel")
    assert s.key() != probe_hook.probe_settings("paper").key()  # another cache entry


def test_startup_probe_option_skips_probe(caplog):
    caplog.set_level(logging.INFO, logger=probe_hook.__name__)
    d = probe_hook.run_startup_probe(None, _server_args(), SpectrumServerOptions(tiers="3"))
    assert d == {"tiers": "3", "source": "option", "passed": None}
    assert probe_hook.resolved_tiers("auto") == "3"
    assert "not run" in caplog.text


def test_startup_probe_falls_back_on_exception(caplog):
    caplog.set_level(logging.INFO, logger=probe_hook.__name__)
    d = probe_hook.run_startup_probe(object(), _server_args(), SpectrumServerOptions())
    assert d["tiers"] == "2" and d["source"] == "fallback" and d["passed"] is None
    assert "AttributeError" in d["reason"]  # object() has no tp_worker
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "falling back to --spectrum-tiers 2" in warnings[0].getMessage()
    assert probe_hook.resolved_tiers("auto") == "2"


def test_gauges_published_with_enable_metrics():
    from prometheus_client import REGISTRY

    probe_hook._publish(
        _server_args(enable_metrics=True, served_model_name="g1"), "3", True, "probe"
    )
    probe_hook._publish(
        _server_args(enable_metrics=True, served_model_name="g2"), "2", None, "fallback"
    )
    probe_hook._publish(_server_args(served_model_name="g3"), "2", False, "probe")  # metrics off

    def val(name, model, source):
        labels = {"model_name": model, "role": "prefill", "source": source}
        return REGISTRY.get_sample_value(name, labels)

    assert val(probe_hook.METRIC_PASS, "g1", "probe") == 1
    assert val(probe_hook.METRIC_TIERS, "g1", "probe") == 3
    assert val(probe_hook.METRIC_PASS, "g2", "fallback") == -1
    assert val(probe_hook.METRIC_TIERS, "g2", "fallback") == 2
    assert val(probe_hook.METRIC_PASS, "g3", "probe") is None


# --------------------------------------------------------------------------- in-process (real
# SGLang ModelRunner on the CPU, real model)

PROBE_CONTEXT = 512  # the smallest haystack the probe accepts: fast on 2 cores


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from sglang_spectrum.models import ensure_model

    return ensure_model("smollm2-135m")


def load_model_runner(model_path: Path, *flags: str):
    """``(server_args, model_runner, tokenizer)``: SGLang's own ``ModelRunner`` with its
    pools, built in this process the way ``sglang.benchmark.one_batch`` builds it
    (0.5.23: ``resolve_once`` + runtime-context ``publish``; 0.5.17: the
    per-process MoE/GEMM configs from ``server_args``), from the flags a server gets."""
    from sglang.benchmark import one_batch as ob
    from sglang.srt.server_args import PortArgs, ServerArgs

    from sglang_spectrum.sglang_plugin.launch import CPU_ENV

    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    server_args = ServerArgs.from_cli_args(
        parser.parse_args(["--model-path", str(model_path), "--device", "cpu", *flags])
    )
    if hasattr(server_args, "resolve_once"):  # 0.5.23
        server_args.resolve_once()
    ob._set_envs_and_config(server_args)
    port_args = PortArgs.init_new(server_args)
    if hasattr(ob, "publish"):  # 0.5.23
        ranks = ob.SpawnRanks(
            world_rank=ob.spawn_world_rank(server_args, tp_rank=0, pp_rank=0), gpu_id=0
        )
        ob.publish(server_args, role="scheduler", ranks=ranks)
        ob._init_process_global_configs()
    else:  # 0.5.17
        ob.initialize_moe_config(server_args)
        ob.initialize_fp8_gemm_config(server_args)
        ob.initialize_fp4_gemm_config(server_args)
    bench_runner, tokenizer = ob.load_model(server_args, port_args, 0, 0)
    return server_args, bench_runner.torch_runner, tokenizer


@pytest.fixture(scope="module")
def runner(smollm2):
    t0 = time.perf_counter()
    server_args, model_runner, tokenizer = load_model_runner(
        smollm2, "--max-total-tokens", "4096", "--context-length", "2048"
    )
    print(f"\nModelRunner for SmolLM2 loaded in {time.perf_counter() - t0:.1f} s")
    scheduler = SimpleNamespace(
        tp_worker=SimpleNamespace(model_runner=model_runner), tokenizer=tokenizer
    )
    return SimpleNamespace(
        server_args=server_args, mr=model_runner, tokenizer=tokenizer, scheduler=scheduler
    )


def _free(mr) -> tuple[int, int]:
    return mr.token_to_kv_pool_allocator.available_size(), mr.req_to_token_pool.available_size()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_engine_answers_and_lossless_round_trip(runner):
    from sglang_spectrum.config import SpectrumConfig
    from sglang_spectrum.sglang_plugin import compat
    from sglang_spectrum.sglang_plugin import sglang_engine as se

    mr, tok = runner.mr, runner.tokenizer
    assert se.model_runner_of(runner.scheduler) is mr
    assert se.kv_dtype_name(mr) == "bfloat16"
    assert se.model_path_of(mr) == str(runner.server_args.model_path)
    assert compat.resolved_server_arg(runner.server_args, "enable_metrics") is False
    before = _free(mr)
    engine = se.SGLangProbeEngine(mr, tok, max_new_tokens=6)
    ids = tok("The capital of France is", add_special_tokens=False).input_ids
    full = engine.generate(ids)
    assert "Paris" in tok.decode(full), tok.decode(full)
    assert _free(mr) == before  # slots and the req_to_token row given back

    # b=1.0 keeps every token 16-bit: the round trip through transfer must leave the
    # pool KV bit-identical, hence the same greedy answer (from the memo, no 2nd prefill)
    forwards = engine.forwards
    lossless = engine.generate(ids, SpectrumConfig(budget=1.0, tiers="3", allow_drop=False))
    assert lossless == full
    assert engine.forwards - forwards == len(full) - 1  # decode steps only
    assert engine.last_tier_counts["fp16"] == len(ids) and engine.last_tier_counts["int4"] == 0
    assert _free(mr) == before

    slots = torch.arange(1, len(ids) + 1)
    pool = se.kv_pool_of(mr)
    k0 = [k[slots].clone() for k in pool.k_buffer]
    counts = se.pack_unpack(
        pool.k_buffer, pool.v_buffer, slots, SpectrumConfig(budget=1.0, allow_drop=False)
    )
    assert counts["fp16"] == len(ids)
    assert all(torch.equal(a, k[slots]) for a, k in zip(k0, pool.k_buffer))

    # b=0.3 with 3 tiers: INT4 tokens on a longer prompt, still no leak
    long_ids = tok(" ".join(["the quick brown fox"] * 60), add_special_tokens=False).input_ids
    engine.generate(long_ids, SpectrumConfig(budget=0.3, tiers="3", allow_drop=False))
    assert engine.last_tier_counts["int4"] > 0 and engine.last_tier_counts["drop"] == 0
    assert _free(mr) == before
    print(f"\nengine: {engine.forwards} forwards, seconds {engine.seconds}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_startup_probe_cache_refresh_run_and_restart(runner, tmp_path, monkeypatch, caplog):
    """One probe run covers the three paths: a (stale) cached decision is read as is,
    ``probe_refresh`` ignores it and runs the probe, the next start reads the new one."""
    from sglang_spectrum.eval.probe import ProbeResult, cached_probe
    from sglang_spectrum.models import weights_identity
    from sglang_spectrum.sglang_plugin.sglang_engine import probe_capacity

    monkeypatch.setenv(probe_hook.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(probe_hook.CONTEXT_ENV, str(PROBE_CONTEXT))
    caplog.set_level(logging.INFO, logger=probe_hook.__name__)
    opts = SpectrumServerOptions(tiers="auto")
    before = _free(runner.mr)

    # 1. a decision cached earlier under this server's key (weights, settings, KV dtype)
    settings = probe_hook.probe_settings("paper", probe_capacity(runner.mr), opts)
    assert settings.context == PROBE_CONTEXT
    stale = ProbeResult("2", False, "0/1 usable trials kept", PROBE_CONTEXT, [], seconds=42.0)
    cache_dir = probe_hook.probe_cache_dir("bfloat16")
    cached_probe(weights_identity(runner.server_args.model_path), lambda: stale, settings,
                 cache_dir=cache_dir)  # fmt: skip
    d0 = probe_hook.run_startup_probe(runner.scheduler, runner.server_args, opts)
    assert (d0["source"], d0["tiers"], d0["passed"]) == ("cache", "2", False), d0
    assert d0["lookup_seconds"] < 1.0 and "read from cache" in caplog.text

    # 2. --spectrum-probe-refresh: the probe runs on SGLang's model runner
    caplog.clear()
    t0 = time.perf_counter()
    refresh = SpectrumServerOptions(tiers="auto", probe_refresh=True)
    d = probe_hook.run_startup_probe(runner.scheduler, runner.server_args, refresh)
    run_s = time.perf_counter() - t0
    assert d["source"] == "probe", d
    assert d["tiers"] == "3" and d["passed"] is True, d  # SmolLM2 tolerates INT4 (README)
    assert d["context"] == PROBE_CONTEXT and d["budget"] == 0.3
    assert len(d["trials"]) == 3 and all(t["full_ok"] for t in d["trials"]), d["trials"]
    assert probe_hook.resolved_tiers("auto") == "3"
    assert _free(runner.mr) == before  # every probe request gave its slots back
    assert "probe run in" in caplog.text and "probe trial 2" in caplog.text
    assert "pack+unpack" in caplog.text and "'int4': 0" not in caplog.text
    files = list(Path(cache_dir).glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["decision"] == "3"

    # 3. restart: the new decision from the cache, in milliseconds
    caplog.clear()
    with probe_hook._lock:
        probe_hook._decision.clear()
    d2 = probe_hook.run_startup_probe(runner.scheduler, runner.server_args, opts)
    assert (d2["source"], d2["tiers"], d2["passed"]) == ("cache", "3", True), d2
    assert d2["trials"] == d["trials"]
    assert d2["lookup_seconds"] < 1.0 and d2["lookup_seconds"] * 20 < run_s
    assert "read from cache" in caplog.text and "probe trial 0" in caplog.text
    assert "pack+unpack" not in caplog.text
    print(
        f"\nprobe (context {PROBE_CONTEXT}): run {run_s:.1f} s, cached lookup"
        f" {d2['lookup_seconds'] * 1000:.1f} ms"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_startup_probe_falls_back_when_the_pool_is_full(runner, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(probe_hook.CACHE_ENV, str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger=probe_hook.__name__)
    allocator = runner.mr.token_to_kv_pool_allocator
    taken = allocator.alloc(allocator.available_size() - 300)  # a busy pool: 300 tokens left
    try:
        d = probe_hook.run_startup_probe(
            runner.scheduler, runner.server_args, SpectrumServerOptions(probe_refresh=True)
        )
    finally:
        allocator.free(taken)
    assert d["tiers"] == "2" and d["source"] == "fallback" and d["passed"] is None
    assert "ProbeUnavailable" in d["reason"] and "room for" in d["reason"], d["reason"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "falling back to --spectrum-tiers 2" in warnings[0].getMessage()
    assert probe_hook.resolved_tiers("auto") == "2"
    assert not any((tmp_path / "cache").rglob("*.json"))  # nothing cached for a fallback


# --------------------------------------------------------------------------- slow (real servers)

sys.path.insert(0, str(Path(__file__).parent))

PROBE_LINE = re.compile(
    r"INT4 probe: (PASS|FAIL) -> tiers ([23]) .*resolved to ([23]) \((probe run|read from cache)"
    r" in ([0-9.]+) s"
)
FALLBACK_LINE = "INT4 probe could not run, falling back to --spectrum-tiers 2"
LONG_PROMPT = (
    "Read the notes and answer the question at the end.\n"
    + " ".join(
        f"Note {i}: the warehouse in district {i % 7} received {3 * i + 11} crates of"
        f" {['apples', 'bolts', 'cables', 'drums', 'eggs'][i % 5]} on day {i}."
        for i in range(24)
    )
    + "\nQuestion: how many crates did the warehouse receive on day 5? Answer:"
)


def _probe_line(log: str) -> re.Match:
    found = PROBE_LINE.search(log)
    assert found, "no probe decision in the prefill log"
    return found


def _prefill_server(request, model_path, log_dir: Path, args=(), env=None):
    """A prefill server alone (no decode, no router); stopped by PID in a finalizer."""
    import requests
    from pd_harness import CPU_ENV, HOST, SERVER_FLAGS, ManagedProcess, free_port

    port, bport = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
        "--port", str(port), *SERVER_FLAGS, "--disaggregation-mode", "prefill",
        "--disaggregation-transfer-backend", "spectrum",
        "--disaggregation-bootstrap-port", str(bport), *args,
    ]  # fmt: skip
    proc = ManagedProcess(
        "prefill", cmd, log_dir / f"prefill-{port}.log", {**os.environ, **CPU_ENV, **(env or {})}
    )
    request.addfinalizer(proc.stop)
    t0 = time.monotonic()
    proc.start()
    url = f"http://{HOST}:{port}"
    while True:
        assert proc.alive(), f"prefill server exited:\n{proc.tail()}"
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() - t0 < 600, f"prefill server not ready:\n{proc.tail()}"
        time.sleep(1.0)
    proc.url, proc.startup_s = url, time.monotonic() - t0
    return proc


def _spectrum_info(d) -> dict:
    import requests

    r = requests.get(f"http://127.0.0.1:{d.bootstrap_port}/spectrum/info", timeout=5)
    r.raise_for_status()
    return r.json()


def _prefill_stats(stats_file: Path) -> list[dict]:
    if not stats_file.is_file():
        return []
    rows = [json.loads(line) for line in stats_file.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("role") == "prefill"]


def _metric(url: str, name: str, **labels: str) -> float:
    import requests

    from sglang_spectrum.sglang_plugin.metrics import parse_prometheus

    return parse_prometheus(requests.get(f"{url}/metrics", timeout=10).text, name, **labels)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_probe_pass_cached_restart_and_int4_end_to_end(request, tmp_path, smollm2):
    from pd_harness import start_deployment

    env = {probe_hook.CACHE_ENV: str(tmp_path / "cache")}
    args = ["--spectrum-tiers", "auto", "--enable-metrics"]
    # 1. first start: the probe runs
    first = _prefill_server(request, smollm2, tmp_path, args, env)
    log1 = first.log_path.read_text(errors="replace")
    m1 = _probe_line(log1)
    assert m1.group(1) == "PASS" and m1.group(3) == "3" and m1.group(4) == "probe run", m1.group(0)
    assert _metric(first.url, probe_hook.METRIC_PASS, source="probe") == 1
    assert _metric(first.url, probe_hook.METRIC_TIERS, source="probe") == 3
    assert FALLBACK_LINE not in log1
    first.stop()
    # 2. second start (a PD deployment on the same cache): cached, far faster
    stats = tmp_path / "stats.jsonl"
    d = start_deployment(
        request,
        model_path=smollm2,
        backend="spectrum",
        prefill_args=[*args, "--spectrum-budget", "0.3"],
        prefill_env={**env, "SGLANG_SPECTRUM_STATS_FILE": str(stats)},
        log_dir=tmp_path / "pd",
        startup_timeout_s=900,  # the probe runs inside the startup (slow on a busy CPU)
    )
    log2 = d.procs[0].log_path.read_text(errors="replace")
    m2 = _probe_line(log2)
    assert m2.group(4) == "read from cache" and "cached" in m2.group(0), m2.group(0)
    run_s, lookup_s = float(m1.group(5)), float(m2.group(5))
    print(
        f"\nprobe run {run_s:.2f} s, cached lookup {lookup_s:.2f} s; startups: prefill alone"
        f" {first.startup_s:.1f} s (probe), PD {d.startup_s:.1f} s (cached)"
    )
    assert lookup_s < 1.0 and lookup_s * 20 < run_s
    assert _metric(d.prefill_url, probe_hook.METRIC_PASS, source="cache") == 1
    # 3. decode learns the resolved tier mode at bootstrap
    ranks = _spectrum_info(d)["ranks"]
    assert ranks and all(r.get("tiers_resolved") == "3" for r in ranks), ranks
    # 4. a request end to end, packed with INT4 tokens
    out = d.generate(LONG_PROMPT, max_new_tokens=8)
    assert out["meta_info"]["completion_tokens"] > 0
    sent = _prefill_stats(stats)
    assert sent, "no prefill transfer record (packed path not active?)"
    assert sent[-1]["tier_mode"] == "3" and sent[-1]["tiers"]["int4"] > 0, sent[-1]
    assert _metric(d.prefill_url, "spectrumkv_tokens_total", role="prefill", tier="int4") > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_probe_fail_serves_two_tiers(request, tmp_path):
    """Gemma 3 270M with per-token key scales fails the probe on SGLang (see README): it
    serves FP16+INT8 only. (With the default per-channel keys it passes on 0.5.23: 2/2
    usable trials at 2048 tokens; per-token keys: 0/2 at 2048, 1/3 at 512.)"""
    from pd_harness import start_deployment

    from sglang_spectrum.models import ensure_model

    stats = tmp_path / "stats.jsonl"
    d = start_deployment(
        request,
        model_path=ensure_model("gemma3-270m"),
        backend="spectrum",
        prefill_args=["--spectrum-tiers", "auto", "--spectrum-budget", "0.3", "--enable-metrics"]
        + ["--spectrum-key-scales", "token"],
        prefill_env={
            probe_hook.CACHE_ENV: str(tmp_path / "cache"),
            "SGLANG_SPECTRUM_STATS_FILE": str(stats),
        },
        log_dir=tmp_path / "pd",
        startup_timeout_s=900,  # the probe runs inside the startup (slow on a busy CPU)
    )
    m = _probe_line(d.procs[0].log_path.read_text(errors="replace"))
    assert m.group(1) == "FAIL" and m.group(3) == "2" and m.group(4) == "probe run", m.group(0)
    assert _metric(d.prefill_url, probe_hook.METRIC_PASS, source="probe") == 0
    assert _metric(d.prefill_url, probe_hook.METRIC_TIERS, source="probe") == 2
    assert all(r.get("tiers_resolved") == "2" for r in _spectrum_info(d)["ranks"])
    out = d.generate(LONG_PROMPT, max_new_tokens=8)
    assert out["meta_info"]["completion_tokens"] > 0
    sent = _prefill_stats(stats)
    assert sent, "no prefill transfer record (packed path not active?)"
    assert sent[-1]["tier_mode"] == "2" and sent[-1]["tiers"]["int4"] == 0, sent[-1]
    assert _metric(d.prefill_url, "spectrumkv_tokens_total", role="prefill", tier="int4") == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_probe_fallback_when_context_too_short(request, tmp_path, smollm2):
    import requests

    server = _prefill_server(
        request,
        smollm2,
        tmp_path,
        ["--spectrum-tiers", "auto", "--context-length", "256", "--enable-metrics"],
        {probe_hook.CACHE_ENV: str(tmp_path / "cache")},
    )
    log = server.log_path.read_text(errors="replace")
    warnings = [line for line in log.splitlines() if FALLBACK_LINE in line]
    assert len(warnings) == 1 and "room for" in warnings[0], warnings
    assert PROBE_LINE.search(log) is None
    assert _metric(server.url, probe_hook.METRIC_TIERS, source="fallback") == 2
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    assert not any((tmp_path / "cache").rglob("*.json"))  # nothing cached for a fallback


# ----------------------------------------------------------------------------- TP coordination


def _coordinated_rank(rank: int, world: int, port: int, scenario: str, out) -> None:
    """One TP rank of a real gloo group running probe_hook.coordinated."""
    import torch.distributed as dist

    from sglang_spectrum.sglang_plugin.probe_hook import coordinated

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    runs = []

    def run():
        runs.append(rank)
        if scenario == "rank1_raises" and rank == 1:
            raise ValueError("no room in the KV pool")
        return {"decision": "3" if rank == 0 else "2", "by": rank}

    # a cache only on rank 0's node ("hit"), or on rank 1's only ("miss": rank 0 decides)
    cached = {"decision": "3", "cached": True}
    lookup = (
        (lambda: cached if rank == 0 else None)
        if scenario == "hit"
        else (lambda: cached if rank == 1 else None)
    )
    try:
        result = coordinated(dist.group.WORLD, lookup, run)
        out.put((rank, "ok", result, runs))
    except RuntimeError as e:
        out.put((rank, "error", str(e), runs))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scenario", ["hit", "miss", "rank1_raises"])
def test_probe_decided_once_and_agreed_on_by_every_tp_rank(scenario):
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_coordinated_rank, args=(r, 2, port, scenario, out)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    (r0, s0, v0, runs0), (r1, s1, v1, runs1) = results
    if scenario == "hit":  # rank 0's cache decides; nobody runs forwards
        assert s0 == s1 == "ok" and v0 == v1 == {"decision": "3", "cached": True}
        assert runs0 == runs1 == []
    elif scenario == "miss":  # both run (the forwards need every rank); rank 0's result wins
        assert s0 == s1 == "ok" and v0 == v1 == {"decision": "3", "by": 0}
        assert runs0 == [0] and runs1 == [1]
    else:  # one rank failed: both raise the same error (and fall back alike)
        assert s0 == s1 == "error" and v0 == v1
        assert "TP rank 1" in v0 and "no room in the KV pool" in v0


def test_single_rank_reads_the_cache_before_running():
    """One TP rank (no group): a cached decision is returned and the trials never run."""
    from sglang_spectrum.sglang_plugin.probe_hook import coordinated

    runs = []

    def run():
        runs.append(1)
        return {"decision": "2"}

    assert coordinated(None, lambda: {"decision": "3", "cached": True}, run)["cached"]
    assert runs == []
    assert coordinated(None, lambda: None, run) == {"decision": "2"} and runs == [1]
