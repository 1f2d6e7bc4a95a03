"""The INT4-tolerance probe at prefill scheduler startup (``--spectrum-tiers auto``).

Fast tests: the decision store, the probe's settings (env overrides, context
shrinking), the no-op / option / fallback / cache paths of
``run_startup_probe`` on stand-in scheduler objects, and the Prometheus gauges.

Slow tests (real SGLang servers on CPU, each stopped by PID in a finalizer):

* a prefill server runs the probe on SmolLM2 (pass -> tiers 3); a second start
  reads the cached decision (the log says so, and the lookup is far faster
  than the run); a PD deployment on that cache sends a request end to end with
  INT4 tokens, and the decode side learns the tier mode at bootstrap;
* a PD deployment of Gemma 3 270M, whose probe fails, serves with tiers 2
  (no INT4 token);
* a prefill server whose context is too short for the probe falls back to
  tiers 2 with one WARNING and keeps serving.
"""

from __future__ import annotations

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

from sglang_spectrum.eval.probe import ProbeResult, cached_probe
from sglang_spectrum.models import weights_identity
from sglang_spectrum.sglang_plugin import probe_hook

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
    base = dict(
        disaggregation_transfer_backend="spectrum",
        disaggregation_mode="prefill",
        spectrum_budget=0.5,
        spectrum_tiers="auto",
        spectrum_allocator="paper",
        spectrum_probe_refresh=False,
        model_path=str(model_path),
        tokenizer_path=str(model_path),
        served_model_name="m",
        enable_metrics=False,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _fake_scheduler(available=16384, context_len=8192, dtype=torch.bfloat16):
    """Just what the cache path touches: pools, capacities, no model."""
    pool = SimpleNamespace(
        k_buffer=[torch.zeros(4, 1, 8, dtype=dtype)], v_buffer=[torch.zeros(4, 1, 8, dtype=dtype)]
    )
    runner = SimpleNamespace(
        token_to_kv_pool=pool,
        token_to_kv_pool_allocator=SimpleNamespace(available_size=lambda: available, page_size=1),
        req_to_token_pool=SimpleNamespace(max_context_len=context_len, available_size=lambda: 8),
        model_config=SimpleNamespace(context_len=context_len),
    )
    return SimpleNamespace(tp_worker=SimpleNamespace(model_runner=runner), tokenizer=None)


@pytest.fixture
def fake_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return folder


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


def test_startup_probe_noop_unless_spectrum_prefill():
    assert (
        probe_hook.run_startup_probe(None, _server_args(disaggregation_transfer_backend="mooncake"))
        == {}
    )
    assert probe_hook.run_startup_probe(None, _server_args(disaggregation_mode="decode")) == {}
    assert probe_hook.decision() == {}


def test_startup_probe_option_skips_probe(caplog):
    caplog.set_level(logging.INFO, logger=probe_hook.__name__)
    d = probe_hook.run_startup_probe(None, _server_args(spectrum_tiers="3"))  # no scheduler needed
    assert d == {"tiers": "3", "source": "option"}
    assert "not run" in caplog.text


def test_startup_probe_falls_back_on_exception(caplog):
    caplog.set_level(logging.INFO, logger=probe_hook.__name__)
    d = probe_hook.run_startup_probe(object(), _server_args())  # no tp_worker: AttributeError
    assert d["tiers"] == "2" and d["source"] == "fallback"
    assert "AttributeError" in d["reason"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "falling back to --spectrum-tiers 2" in warnings[0].getMessage()
    assert probe_hook.resolved_tiers("auto") == "2"


def test_startup_probe_falls_back_when_context_too_short(caplog, fake_model):
    caplog.set_level(logging.WARNING, logger=probe_hook.__name__)
    d = probe_hook.run_startup_probe(_fake_scheduler(context_len=256), _server_args(fake_model))
    assert d["source"] == "fallback" and "ProbeUnavailable" in d["reason"]
    assert len(caplog.records) == 1 and "room for" in caplog.records[0].getMessage()


def test_startup_probe_reads_cache_and_refresh_reruns(tmp_path, monkeypatch, caplog, fake_model):
    monkeypatch.setenv(probe_hook.CACHE_ENV, str(tmp_path / "cache"))
    settings = probe_hook.probe_settings("paper", capacity=16384 - 1)
    trial = dict(
        context=2048, depth=0.5, needle="1234567", full_answer=" 1234567", full_ok=True,
        degraded_answer=" 1234567", degraded_ok=True,
    )  # fmt: skip
    stored = ProbeResult("3", True, "1/1 usable trials kept", 2048, [trial], seconds=42.0)
    cached_probe(
        weights_identity(fake_model),
        lambda: stored,
        settings,
        cache_dir=probe_hook.probe_cache_dir("bfloat16"),
    )
    caplog.set_level(logging.INFO, logger=probe_hook.__name__)
    d = probe_hook.run_startup_probe(_fake_scheduler(), _server_args(fake_model))
    assert d["tiers"] == "3" and d["source"] == "cache" and d["passed"] is True
    assert d["lookup_seconds"] < 1.0
    assert "read from cache" in caplog.text and "probe trial 0" in caplog.text
    # another KV dtype is another cache entry: not found, the probe must run
    # (here it cannot: the fake folder has no tokenizer) -> fallback
    d = probe_hook.run_startup_probe(_fake_scheduler(dtype=torch.float16), _server_args(fake_model))
    assert d["source"] == "fallback"
    # --spectrum-probe-refresh ignores the cache (and runs, which fails here too)
    d = probe_hook.run_startup_probe(
        _fake_scheduler(), _server_args(fake_model, spectrum_probe_refresh=True)
    )
    assert d["source"] == "fallback"


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


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from sglang_spectrum.models import ensure_model

    return ensure_model("smollm2-135m")


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
    """Gemma 3 270M fails the probe on SGLang (see README): it serves FP16+INT8 only."""
    from pd_harness import start_deployment

    from sglang_spectrum.models import ensure_model

    stats = tmp_path / "stats.jsonl"
    d = start_deployment(
        request,
        model_path=ensure_model("gemma3-270m"),
        backend="spectrum",
        prefill_args=["--spectrum-tiers", "auto", "--spectrum-budget", "0.3", "--enable-metrics"],
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
