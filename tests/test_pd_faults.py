"""Damaged packed buffers fail one request cleanly (slow: one real PD deployment).

The prefill server runs with the test-only switch ``SGLANG_SPECTRUM_FAULT=rid``:
a request whose rid contains ``spectrum-fault-<mode>`` gets that fault after
packing (:func:`sglang_spectrum.sglang_plugin.faults.fault_for`):

* ``corrupt``  one payload byte flipped        -> payload checksum mismatch
* ``header``   one header byte flipped         -> header checksum mismatch
* ``truncate`` only half of the blob written   -> truncated buffer
* ``stale``    blob announced with another checksum -> stale/foreign data

For each: the client gets an HTTP error naming the problem, the KV slots are
freed on both sides (``/v1/loads`` token counts back to idle), the failure is
counted on the decode's ``/metrics``, and both servers then serve the next
request exactly as before the fault.

The decode's receive arena is small (``--spectrum-arena-mb 24``): two
concurrent ~1,500-token requests (about 17.6 MB of receive buffer each at
budget 0.5) do not fit at once, so the second one waits (back-pressure) and
both succeed; a request bigger than the whole arena fails with a message
naming the option.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests
from pd_harness import PDDeployment, start_deployment

from sglang_spectrum.models import ensure_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PROBE_PROMPT = "The capital of France is"
LONG_PROMPT = "Notes. " + "The river flows to the sea. " * 60 + "Where does the river flow? To the"
ARENA_MB = 24
FILLER = "The grass is green. The sky is blue. The sun is warm. "
EXPECTED = {
    "corrupt": "payload checksum mismatch: the KV data is corrupted",
    "header": "header checksum mismatch: the header is corrupted",
    "truncate": "truncated buffer",
    "stale": "payload checksum differs from the one the sender announced",
}


@pytest.fixture(scope="module")
def faulty(request) -> dict:
    d = start_deployment(
        request,
        model_path=ensure_model("smollm2-135m"),
        backend="spectrum",
        common_args=["--enable-metrics"],
        prefill_args=["--spectrum-budget", "0.5", "--spectrum-tiers", "3"],
        prefill_env={"SGLANG_SPECTRUM_FAULT": "rid"},
        decode_args=["--spectrum-arena-mb", str(ARENA_MB)],
        router_args=["--disable-retries", "--disable-circuit-breaker"],
        stats=True,
    )
    baseline = {p: d.generate(p, max_new_tokens=12)["text"] for p in (PROBE_PROMPT, LONG_PROMPT)}
    assert d.wait_idle(d.prefill_url) == 0 and d.wait_idle(d.decode_url) == 0
    return {"d": d, "baseline": baseline}


def _failed(d: PDDeployment, url: str, role: str) -> float:
    return d.metric(url, "spectrumkv_requests_total", role=role, outcome="failed")


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_damaged_buffer_fails_one_request_cleanly(faulty, mode):
    d: PDDeployment = faulty["d"]
    failed_before = _failed(d, d.decode_url, "decode")
    with pytest.raises(requests.HTTPError) as exc:
        d.generate(LONG_PROMPT, max_new_tokens=12, rid=f"t-spectrum-fault-{mode}-1")
    msg = str(exc.value)
    assert exc.value.response.status_code >= 500
    assert "SpectrumKV: packed KV of request" in msg and EXPECTED[mode] in msg, msg
    # KV slots freed on both sides
    assert d.wait_idle(d.prefill_url) == 0
    assert d.wait_idle(d.decode_url) == 0
    assert _failed(d, d.decode_url, "decode") == failed_before + 1
    # both servers serve the next requests as before the fault
    for prompt, text in faulty["baseline"].items():
        assert d.generate(prompt, max_new_tokens=12)["text"] == text
    assert d.wait_idle(d.prefill_url) == 0 and d.wait_idle(d.decode_url) == 0


def test_fault_records_name_the_request(faulty):
    stats = faulty["d"].spectrum_stats()
    faults = {s["fault"] for s in stats if s["role"] == "prefill" and s.get("fault")}
    assert faults <= set(EXPECTED)
    # a failed request never produced a decode-side (unpacked) record
    decoded = {s["rid"] for s in stats if s["role"] == "decode"}
    assert not any("spectrum-fault" in rid for rid in decoded)


def test_logs_explain_the_faults(faulty):
    d: PDDeployment = faulty["d"]
    prefill_log = d.proc("prefill").log_path.read_text(errors="replace")
    decode_log = d.proc("decode").log_path.read_text(errors="replace")
    assert "SpectrumKV TEST FAULT" in prefill_log
    # the default --spectrum-staging auto under Mooncake TCP (MC_FORCE_TCP): host staging,
    # so the faults above were injected before the staging copy and still caught
    assert "'staging': 'auto'" in prefill_log and "host staging arena" in prefill_log
    assert "rejected: SpectrumFormatError" in decode_log
    # the explicit 24 MiB arena is below the prefill's longest request (8192 tokens at
    # b=0.5): said at startup and again once the prefill's options are known
    assert "arena cannot hold the longest request" in decode_log
    assert "packs the longest request (8192 tokens)" in decode_log
    assert "--spectrum-budget 0.5" in decode_log
    assert "Traceback" not in decode_log and "Traceback" not in prefill_log
    assert isinstance(Path(d.log_dir), Path)


def test_full_receive_arena_defers_instead_of_failing(faulty):
    d: PDDeployment = faulty["d"]
    prompts = [f"Report {i}. " + FILLER * 110 + "In one word, the sky is" for i in range(2)]
    out: dict = {}

    def run(i: int) -> None:
        try:
            out[i] = d.generate(prompts[i], max_new_tokens=4, timeout_s=300)["text"]
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    assert all(isinstance(out.get(i), str) for i in range(2)), out
    log = d.proc("decode").log_path.read_text(errors="replace")
    assert "SpectrumKV: receive arena full" in log  # the second request waited
    assert d.wait_idle(d.prefill_url) == 0 and d.wait_idle(d.decode_url) == 0


def test_request_larger_than_receive_arena_fails_cleanly(faulty):
    d: PDDeployment = faulty["d"]
    with pytest.raises(requests.HTTPError) as exc:
        d.generate("Long log. " + FILLER * 240 + "Summary:", max_new_tokens=4)
    msg = str(exc.value)
    assert "receive arena has" in msg and "--spectrum-arena-mb" in msg, msg
    assert d.wait_idle(d.prefill_url) == 0 and d.wait_idle(d.decode_url) == 0
    assert d.generate(PROBE_PROMPT, max_new_tokens=12)["text"] == faulty["baseline"][PROBE_PROMPT]
