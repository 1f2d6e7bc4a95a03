"""End-to-end PD serving on CPU with real servers (slow: each deployment starts in ~1 min).
(Lossless budget-1.0 serving against a single server: test_pd_serving.py.)

A prefill server, a decode server and the router run as real processes
(:mod:`pd_harness`, i.e. :mod:`sglang_spectrum.sglang_plugin.launch`); every
process is stopped by PID (process group) in a finalizer, also on failure.

* ``half``: one ``spectrum`` deployment at budget 0.5 with 3 tiers and the
  Hadamard-rotated, group-32 codec with per-channel key scales (plain INT4
  serving is covered by test_pd_faults.py), ``--page-size 16`` on both sides,
  ``--chunked-prefill-size 256`` and ``--spectrum-layer-group 8`` (each chunk sent
  as 4 parts of layers, packed during its forward; a prompt the prefill has cached
  goes in chunk parts instead): the bytes that crossed Mooncake
  (prefill's sent counter, decode's received counter, on their ``/metrics``)
  are <= 0.5 of the 16-bit KV size of the same prompts; a secret only in a
  ~1,500-token prompt is answered; finally the decode server is SIGKILLed
  during a transfer, the request fails, the prefill frees its slots, and after
  a new decode server starts on the same ports the next request is served. The
  decode unpacks each part as it lands (``--spectrum-unpack arrival``); a part
  damaged on the wire fails its request there, cleanly.
* refusals (run before ``half`` starts, so only one deployment runs at a
  time): mismatched format versions and a mooncake prefill are refused at
  bootstrap with a clear message.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from pd_harness import PDDeployment, start_delayed_request, start_deployment

from sglang_spectrum.models import ensure_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

PROMPTS = ["The capital of France is"]
SECRET = "48151623"
FILLER = "The grass is green. The sky is blue. The sun is warm. "
# ~1,500 tokens; the secret appears only at its start
LONG_SECRET_PROMPT = (
    f"The secret code is {SECRET}. Remember it. "
    + FILLER * 110
    + "Question: what is the secret code? Answer: the secret code is"
)
# SmolLM2-135M: 30 layers x (K,V) x 3 KV heads x 64 x 2 bytes per token
FULL_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2
CHUNK = 256
LAYER_GROUP = 8  # SmolLM2's 30 layers: parts of layers 0-8, 8-16, 16-24, 24-30
GROUPS = [[0, 8], [8, 16], [16, 24], [24, 30]]
KILL_DELAY_S = 8.0


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_model("smollm2-135m")


# --------------------------------------------------------------------------- refusals


def test_version_mismatch_is_refused_with_clear_message(request, model_path):
    d = start_deployment(
        request,
        model_path=model_path,
        backend="spectrum",
        prefill_env={"SGLANG_SPECTRUM_TEST_FORMAT_VERSION": "999"},
        router_args=["--disable-retries"],
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
    assert "aborted room" in d.proc("prefill").log_path.read_text()


def test_spectrum_decode_refuses_mooncake_prefill(request, model_path):
    d = start_deployment(
        request,
        model_path=model_path,
        backend="mooncake",
        decode_backend="spectrum",
        router_args=["--disable-retries"],
    )
    with pytest.raises(requests.HTTPError) as exc:
        d.generate(PROMPTS[0], max_new_tokens=4, timeout_s=120)
    assert "is not a SpectrumKV server" in str(exc.value), str(exc.value)
    assert requests.get(f"{d.decode_url}/health", timeout=10).status_code == 200


# --------------------------------------------------------------------------- budget 0.5


@pytest.fixture(scope="module")
def half(request, model_path) -> PDDeployment:
    """Spectrum at budget 0.5 (3 tiers, Hadamard rotation, group 32, per-channel key
    scales), page size 16, chunked prefill 256, metrics on, host staging (the prefill
    sends each packed part from a copy in its host staging arena)."""
    # SGLang's paged allocator (page_size > 1) is a Triton kernel
    # (mem_cache/allocator.py:427): on CPU it runs in Triton's interpreter.
    env = {"TRITON_INTERPRET": "1"}
    return start_deployment(
        request,
        model_path=model_path,
        backend="spectrum",
        common_args=[
            "--page-size",
            "16",
            "--chunked-prefill-size",
            str(CHUNK),
            "--enable-metrics",
            "--spectrum-staging",
            "host",
        ],  # fmt: skip
        prefill_args=["--spectrum-budget", "0.5", "--spectrum-tiers", "3"]
        + ["--spectrum-rotation", "hadamard", "--spectrum-group-size", "32"]
        + ["--spectrum-key-scales", "channel", "--spectrum-layer-group", str(LAYER_GROUP)],
        prefill_env={
            **env,
            "SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S": str(KILL_DELAY_S),
            "SGLANG_SPECTRUM_FAULT": "rid",
        },
        decode_env=env,
        # a killed decode refuses connections at once (3 checks, ~6 s, out of rotation);
        # a live server slowed by a loaded CI machine gets 30 s per check (one 5 s
        # timeout with threshold 1 once took the prefill out: "no available workers")
        router_args=[
            "--disable-retries",
            "--disable-circuit-breaker",
            "--health-check-interval-secs",
            "2",
            "--health-check-timeout-secs",
            "30",
            "--health-failure-threshold",
            "3",
            "--health-success-threshold",
            "1",
        ],  # fmt: skip
        stats=True,
    )


def _counters(d: PDDeployment) -> dict[str, float]:
    return {
        "sent": d.metric(d.prefill_url, "spectrumkv_sent_bytes_total", role="prefill"),
        # SGLang's own per-request transfer size (finding 14: it read 0), in MiB
        "sglang_mb": d.metric(d.prefill_url, "sglang:kv_transfer_total_mb_sum"),
        "sglang_n": d.metric(d.prefill_url, "sglang:kv_transfer_total_mb_count"),
        "p_full": d.metric(d.prefill_url, "spectrumkv_full_bytes_total", role="prefill"),
        "received": d.metric(d.decode_url, "spectrumkv_received_bytes_total", role="decode"),
        "d_full": d.metric(d.decode_url, "spectrumkv_full_bytes_total", role="decode"),
    }


def test_half_budget_page16_both_sides(half):
    for side in ("prefill", "decode"):
        log = half.proc(side).log_path.read_text(errors="replace")
        assert "dtype=bfloat16, page_size=16, " in log, side
        assert "'staging': 'host'" in log, side
    log = half.proc("prefill").log_path.read_text(errors="replace")
    assert "packed parts are sent from a" in log and "host staging arena" in log


def test_half_budget_bytes_counted_on_both_sides(half):
    before = _counters(half)
    prompt_tokens = 0
    for i, n in enumerate((60, 90, 120)):
        r = half.generate(f"Document {i}. " + FILLER * n + "Summary:", max_new_tokens=4)
        prompt_tokens += r["meta_info"]["prompt_tokens"]
    after = _counters(half)
    delta = {k: after[k] - before[k] for k in after}
    full_bytes = prompt_tokens * FULL_BYTES_PER_TOKEN  # 16-bit KV of the same prompts
    print(f"\nbytes: {delta}, 16-bit KV of {prompt_tokens} tokens = {full_bytes}")
    assert delta["p_full"] == full_bytes and delta["d_full"] == full_bytes
    assert delta["sent"] == delta["received"] > 0
    # SGLang's kv_transfer_total_mb counts the same packed bytes, one sample a request
    assert delta["sglang_n"] == 3
    assert delta["sglang_mb"] == pytest.approx(delta["sent"] / 2**20, rel=1e-6)
    assert delta["sent"] <= 0.5 * full_bytes, delta["sent"] / full_bytes
    assert delta["received"] <= 0.5 * full_bytes
    # per request too, and with all three tiers in use
    records = [s for s in half.spectrum_stats() if s["role"] == "prefill"][-3:]
    assert all(s["sent_bytes"] <= 0.5 * s["full_bytes"] for s in records), records
    assert all(s["tiers"]["int4"] > 0 and s["tiers"]["int8"] > 0 for s in records), records
    metrics = half.metrics_text(half.prefill_url)
    for name in ("spectrumkv_pack_seconds", "spectrumkv_transfer_seconds", "spectrumkv_tier_mode"):
        assert name in metrics
    assert half.metric(half.prefill_url, "spectrumkv_tier_mode", role="prefill", mode="3") == 1
    assert half.metric(half.prefill_url, "spectrumkv_tier_mode", role="prefill", mode="2") == 0
    assert "spectrumkv_unpack_seconds" in half.metrics_text(half.decode_url)
    # the decode learnt the prefill's codec at bootstrap (the packed headers carry it too)
    log = half.proc("decode").log_path.read_text()
    assert "'rotation': 'hadamard'" in log and "'group_size': 32" in log
    assert "'key_scales': 'channel'" in log


def test_secret_only_in_long_prompt_at_half_budget(half):
    r = half.generate(LONG_SECRET_PROMPT, max_new_tokens=12, rid="e2e-long-secret")
    n = r["meta_info"]["prompt_tokens"]
    assert n > 1300, n
    assert n > 4 * CHUNK  # several prefill chunks: earlier chunks' pages held until the last
    assert SECRET in r["text"], r["text"]
    stats = [s for s in half.spectrum_stats() if s["rid"] == "e2e-long-secret"]
    roles = {s["role"]: s for s in stats}
    assert roles["prefill"]["num_tokens"] == n and roles["decode"]["num_tokens"] == n
    assert roles["prefill"]["ratio"] <= 0.5
    assert roles["decode"]["received_bytes"] == roles["prefill"]["sent_bytes"]
    # --spectrum-layer-group 8: every chunk went as 4 parts of layers, each handed to the
    # packer during the chunk's forward; the decode unpacked every one into its layers
    pre = roles["prefill"]
    chunks = -(-n // CHUNK)
    assert pre["layer_group"] == LAYER_GROUP
    assert pre["parts"] == roles["decode"]["parts"] == chunks * len(GROUPS), pre
    # the per-part timeline: tokens add up (once per chunk), parts submitted in order,
    # each at b=0.5, the groups of every chunk in layer order
    profile = pre["part_profile"]
    assert len(profile) == pre["parts"]
    assert [row[6:8] for row in profile] == GROUPS * chunks, profile
    assert sum(row[0] for row in profile if row[7] == 30) == n
    assert [row[2] for row in profile] == sorted(row[2] for row in profile)
    assert all(row[1] == 0.5 and min(row[3:6]) >= 0 for row in profile), profile
    # the scheduler thread's share: every part's hand-over, small against the forward
    assert 0 < pre["scheduler_ms"] < 50 * pre["parts"], pre["scheduler_ms"]
    # --spectrum-unpack arrival (the decode's default): every part was unpacked as it
    # landed (the last chunk's groups too: nothing is left for the final job), so after
    # Sent only the metadata row is written
    dec = roles["decode"]
    assert dec["parts_on_arrival"] == pre["parts"], dec
    assert 0 < dec["unpack_ms"] < dec["arrival_unpack_ms"], dec
    # every group of a chunk holds the chunk's tokens (the map they share: test_transfer)
    for c in range(chunks):
        assert len({row[0] for row in profile[4 * c : 4 * c + 4]}) == 1, profile
    # the request's timeline, both servers on one clock: the decode granted, the first
    # part landed, Sent came, the KV was in the pool, SGLang's poll saw it; the prefill
    # was ready (every grant) before its first part, and sent between the two sides'
    # grant and Sent (1 ms: the Unix ms are rounded)
    tl, ptl = dec["timeline_ms"], pre["timeline_ms"]
    assert 0 < tl["granted"] <= tl["first_landed"] <= tl["sent"] <= tl["ready"] <= tl["polled"]
    assert 0 < ptl["ready"] <= profile[0][2] <= ptl["sent"], (ptl, profile[0])
    sent_at = pre["created_unix_ms"] + ptl["sent"] - dec["created_unix_ms"]
    assert tl["granted"] - 1 <= sent_at <= tl["sent"] + 1, (sent_at, tl)


def test_prefill_cached_prompt_goes_in_chunk_parts(half):
    """The prefill's radix cache holds the long prompt's prefix, the decode does not:
    those positions must be sent first, so this request is not layer-pipelined; its
    chunks go as whole parts (--spectrum-stream chunks) and the answer is the same."""
    r = half.generate(LONG_SECRET_PROMPT, max_new_tokens=12, rid="e2e-cached-secret")
    n = r["meta_info"]["prompt_tokens"]
    assert SECRET in r["text"], r["text"]
    roles = {s["role"]: s for s in half.spectrum_stats() if s["rid"] == "e2e-cached-secret"}
    pre = roles["prefill"]
    assert pre["layer_group"] == 0 and pre["num_tokens"] == roles["decode"]["num_tokens"] == n
    assert pre["parts"] == roles["decode"]["parts"] >= 1 and pre["ratio"] <= 0.5
    assert all(len(row) == 6 for row in pre["part_profile"]), pre["part_profile"]
    assert roles["decode"]["parts_on_arrival"] == pre["parts"] - 1, roles["decode"]


def test_part_rejected_on_landing_fails_the_request_cleanly(half):
    """A layer group damaged on the wire (every group before the last: the test fault
    ``spectrum-fault-early-corrupt``) is rejected when the decode unpacks it on landing,
    while the prefill is still computing and sending the later groups: the request fails
    with the reason, the decode keeps its region until the prefill acknowledges, both
    sides free everything, and the next request is served."""
    assert half.wait_idle(half.prefill_url) == 0
    prompt = "Another note. " + LONG_SECRET_PROMPT  # not in the prefill's radix cache
    with pytest.raises(requests.HTTPError) as exc:
        half.generate(prompt, max_new_tokens=12, rid="e2e-spectrum-fault-early-corrupt")
    msg = str(exc.value)
    assert "SpectrumKV: packed KV of request" in msg and "payload checksum mismatch" in msg, msg
    assert half.wait_idle(half.prefill_url) == 0 and half.wait_idle(half.decode_url) == 0
    dlog = half.proc("decode").log_path.read_text(errors="replace")
    assert "rejected: SpectrumFormatError" in dlog and "Traceback" not in dlog
    decoded = {s["rid"] for s in half.spectrum_stats() if s["role"] == "decode"}
    assert "e2e-spectrum-fault-early-corrupt" not in decoded
    r = half.generate(LONG_SECRET_PROMPT, max_new_tokens=12)
    assert SECRET in r["text"], r["text"]


def test_prompt_longer_than_chunked_prefill_size(half):
    prompt = "Chapter one. " + FILLER * 40 + "The end. In one word, the sky is"
    r = half.generate(prompt, max_new_tokens=6)
    assert CHUNK < r["meta_info"]["prompt_tokens"] < 2 * CHUNK + 200
    assert r["text"].strip(), r


def test_decode_killed_mid_transfer(half):
    """Kill decode while a long prompt's transfer is in flight; restart it; serve again."""
    assert half.wait_idle(half.prefill_url) == 0
    thread, result = start_delayed_request(
        half, LONG_SECRET_PROMPT, "kill-spectrum-delay-1", 8, 180
    )
    plog = half.proc("prefill").log_path
    half.kill_decode()  # packed, waiting for its Mooncake write
    thread.join(timeout=180)
    assert "e" in result, result  # that request failed
    assert isinstance(result["e"], requests.RequestException)
    # the prefill saw the failed write and freed the request's slots
    assert half.wait_idle(half.prefill_url, timeout_s=60) == 0
    log = plog.read_text(errors="replace")
    assert "SpectrumKV: transfer of room" in log and "Mooncake write to" in log
    assert requests.get(f"{half.prefill_url}/health", timeout=10).status_code == 200
    # a new decode server joins on the same ports; the next request is served
    half.restart_decode()
    deadline = time.monotonic() + 120
    while True:
        try:
            r = half.generate(LONG_SECRET_PROMPT, max_new_tokens=12, timeout_s=120)
            break
        except requests.RequestException:
            assert time.monotonic() < deadline, "no request served after the decode restart"
            time.sleep(2)
    assert SECRET in r["text"], r["text"]
    assert half.wait_idle(half.prefill_url) == 0 and half.wait_idle(half.decode_url) == 0
