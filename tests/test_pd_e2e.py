"""End-to-end PD serving on CPU with real servers (slow, about 1-2 min per deployment).

A prefill server, a decode server and the router run as real processes
(:mod:`pd_harness`), once with ``--disaggregation-transfer-backend mooncake``
and once with ``spectrum``: greedy outputs must be identical (this stage moves
KV exactly like Mooncake), and a secret that appears only in the prompt must
come back from the decode server (so the KV really crossed over). Further
deployments check that mismatched peers are refused with a clear message.
Every server is stopped by PID (process group) in a finalizer, also on failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from pd_harness import PDDeployment, start_deployment

from sglang_spectrum.models import ensure_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors of the rainbow:",
    "Water boils at a temperature of",
]
SECRET = "48151623"
SECRET_PROMPT = f"The secret code is {SECRET}. What is the secret code? Answer with the code only."
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_model("smollm2-135m")


def _collect(d: PDDeployment) -> dict:
    out: dict = {"startup_s": round(d.startup_s, 1), "texts": [], "latency_s": []}
    for prompt in PROMPTS:
        t0 = time.monotonic()
        r = d.generate(prompt, max_new_tokens=MAX_NEW_TOKENS)
        out["latency_s"].append(round(time.monotonic() - t0, 2))
        out["texts"].append(r["text"])
        assert r["meta_info"]["completion_tokens"] > 0
    out["secret_answer"] = d.chat(SECRET_PROMPT, max_tokens=16)
    out["logs"] = {p.name: p.log_path.read_text(errors="replace") for p in d.procs}
    return out


@pytest.fixture(scope="module")
def results(request, model_path) -> dict:
    """Outputs of the same prompts through a mooncake and a spectrum deployment (one at a time)."""
    out = {}
    for backend in ("mooncake", "spectrum"):
        d = PDDeployment(model_path, backend=backend)
        request.addfinalizer(d.stop)
        d.start()
        try:
            out[backend] = _collect(d)
        finally:
            d.stop()
        print(
            f"\n[{backend}] startup {out[backend]['startup_s']} s,"
            f" request latency {out[backend]['latency_s']} s, logs {d.log_dir}"
        )
    return out


def test_spectrum_outputs_identical_to_mooncake(results):
    mooncake, spectrum = results["mooncake"], results["spectrum"]
    assert all(t.strip() for t in mooncake["texts"]), mooncake["texts"]
    assert spectrum["texts"] == mooncake["texts"]
    assert spectrum["secret_answer"] == mooncake["secret_answer"]


@pytest.mark.parametrize("backend", ["mooncake", "spectrum"])
def test_prompt_only_secret_comes_back(results, backend):
    assert SECRET in results[backend]["secret_answer"], results[backend]["secret_answer"]


def test_spectrum_plugin_active_in_scheduler_processes(results):
    logs = results["spectrum"]["logs"]
    assert "SpectrumKV prefill manager ready" in logs["prefill"]
    assert "SpectrumKV decode manager ready" in logs["decode"]
    for side in ("prefill", "decode"):
        assert "SpectrumKV: KV pool attached (MHATokenToKVPool" in logs[side]
    assert "verified (format v" in logs["decode"]  # decode checked the prefill's version
    assert "SpectrumKV" not in results["mooncake"]["logs"]["prefill"]


def test_version_mismatch_is_refused_with_clear_message(request, model_path):
    d = start_deployment(
        request,
        model_path=model_path,
        backend="spectrum",
        prefill_env={"SGLANG_SPECTRUM_TEST_FORMAT_VERSION": "999"},
    )
    t0 = time.monotonic()
    with pytest.raises(requests.HTTPError) as exc:
        d.generate(PROMPTS[0], max_new_tokens=4, timeout_s=120)
    assert time.monotonic() - t0 < 60  # refused at handshake, not after a timeout
    msg = str(exc.value)
    assert "SpectrumKV format version mismatch" in msg and "speaks v999" in msg, msg
    # both servers survive and the prefill freed the request at once
    assert requests.get(f"{d.decode_url}/health", timeout=10).status_code == 200
    assert requests.get(f"{d.prefill_url}/health", timeout=10).status_code == 200
    assert "decode server refused the transfer" in d.procs[0].log_path.read_text()


def test_spectrum_decode_refuses_mooncake_prefill(request, model_path):
    d = start_deployment(
        request, model_path=model_path, backend="mooncake", decode_backend="spectrum"
    )
    with pytest.raises(requests.HTTPError) as exc:
        d.generate(PROMPTS[0], max_new_tokens=4, timeout_s=120)
    assert "is not a SpectrumKV server" in str(exc.value), str(exc.value)
    assert requests.get(f"{d.decode_url}/health", timeout=10).status_code == 200
