"""Prefix reuse, client aborts and a load run on a real PD deployment (slow).

One ``spectrum`` deployment at budget 1.0 (lossless: outputs must equal a
single non-disaggregated server's) with the decode's radix cache on and the
test-only transfer delay for rids containing ``spectrum-delay``:

* prefix reuse: the decode already holds a page-aligned prefix of the second
  prompt; the prefill packs and sends only the rest (importance scored over
  the whole prompt), and the answer is the single server's;
* a client abort while the transfer waits: the request ends, the prefill
  acknowledges, nothing lands afterwards (the next requests, whose KV reuses
  the freed slots, answer exactly as before), token usage returns to 0;
* (load under churn: tests/test_soak.py, the soak benchmark's CI variant.)
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from pd_harness import PDDeployment, SingleServer, start_delayed_request, start_deployment

from sglang_spectrum.models import ensure_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SECRET = "73920451"
FILLER = "The grass is green. The sky is blue. The sun is warm. "
BASE = f"The secret code is {SECRET}. Remember it. " + FILLER * 40
PROMPTS = [
    BASE + "Question: what is the secret code? Answer: the secret code is",
    BASE + "Question: what colour is the sky? Answer: the sky is",
]
BASELINE = ["The capital of France is", "def fibonacci(n):"]
DELAY_S = 6.0


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_model("smollm2-135m")


@pytest.fixture(scope="module")
def reference(request, model_path) -> dict[str, str]:
    """Greedy outputs of one non-disaggregated server."""
    single = SingleServer(model_path)
    request.addfinalizer(single.stop)
    single.start()
    try:
        return {p: single.generate(p, 12)["text"] for p in PROMPTS + BASELINE}
    finally:
        single.stop()


@pytest.fixture(scope="module")
def pd(request, model_path, reference) -> PDDeployment:
    return start_deployment(
        request,
        model_path=model_path,
        backend="spectrum",
        prefill_args=["--spectrum-budget", "1.0"],
        decode_args=["--disaggregation-decode-enable-radix-cache"],
        prefill_env={"SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S": str(DELAY_S)},
        router_args=["--disable-retries"],
        stats=True,
    )


def _records(d: PDDeployment, rid: str) -> dict[str, dict]:
    return {s["role"]: s for s in d.spectrum_stats() if s["rid"] == rid}


def test_decode_prefix_reuse_sends_only_the_rest(pd, reference):
    first = pd.generate(PROMPTS[0], max_new_tokens=12, rid="prefix-first")
    assert first["text"] == reference[PROMPTS[0]]
    second = pd.generate(PROMPTS[1], max_new_tokens=12, rid="prefix-second")
    assert second["text"] == reference[PROMPTS[1]]
    rec = _records(pd, "prefix-second")
    n = second["meta_info"]["prompt_tokens"]
    prefix = rec["decode"]["prefix_tokens"]
    assert prefix > 0, rec  # the decode reused its cached prefix
    assert rec["prefill"]["context_tokens"] == prefix  # scored over the whole prompt
    assert rec["prefill"]["num_tokens"] == n - prefix == rec["decode"]["num_tokens"]
    assert rec["decode"]["received_bytes"] == rec["prefill"]["sent_bytes"]
    assert _records(pd, "prefix-first")["decode"]["prefix_tokens"] == 0


def test_client_abort_during_transfer_leaves_nothing_behind(pd, reference):
    rid = "abort-spectrum-delay-1"
    prompt = "Abort me. " + FILLER * 20 + "End."
    thread, result = start_delayed_request(pd, prompt, rid, 8, 120)
    plog = pd.proc("prefill").log_path
    r = requests.post(f"{pd.decode_url}/abort_request", json={"rid": rid}, timeout=10)
    assert r.status_code == 200
    thread.join(timeout=120)
    # the client got no answer built from that KV
    if "r" in result:
        assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort", result
    time.sleep(DELAY_S + 2)  # past the delayed write
    assert "aborted room" in plog.read_text(errors="replace")
    assert "decode" not in _records(pd, rid)  # never unpacked
    assert pd.wait_idle(pd.prefill_url) == 0 and pd.wait_idle(pd.decode_url) == 0
    for prompt in BASELINE:  # their KV reuses the freed slots: exactly as before
        assert pd.generate(prompt, max_new_tokens=12)["text"] == reference[prompt]


def _pd_generate_on_dp_rank(d: PDDeployment, prompt: str, rid: str, dp: int) -> dict:
    """One request posted to both servers the way a DP-aware router does: the prefill
    request routed to DP rank ``dp``, and both told that rank (``disagg_prefill_dp_rank``)
    so the decode bootstraps against that prefill DP group."""
    room = random.getrandbits(62) * 2 + dp  # follow_bootstrap_room agrees: room % 2 == dp
    body = {
        "text": prompt,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 12},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": d.bootstrap_port,
        "bootstrap_room": room,
        "disagg_prefill_dp_rank": dp,
    }
    with ThreadPoolExecutor(2) as pool:
        pre = pool.submit(
            requests.post,
            f"{d.prefill_url}/generate",
            json={**body, "rid": rid, "routed_dp_rank": dp},
            timeout=300,
        )
        dec = pool.submit(
            requests.post, f"{d.decode_url}/generate", json={**body, "rid": rid}, timeout=300
        )
        r = dec.result()
        pre.result()
    assert r.status_code == 200, r.text
    return r.json()


def test_data_parallel_prefill_and_decode_answer_like_a_single_server(
    request, model_path, reference
):
    """--dp-size 2 (no DP attention) on both servers: every prefill DP rank registers
    at the bootstrap server under its own DP group (the decode waits for all of them),
    and requests on either prefill DP rank answer exactly like one server (budget 1.0).

    SGLang's sender checks ``attn_dp_rank == room % dp_size`` unless the request names
    its prefill DP rank; without DP attention every DP scheduler has attn_dp_rank 0, so
    a router must name the rank (sglang-router 0.3.2's --dp-aware refuses our
    loopback workers: "resolve_deny"). The requests are posted as such a router does."""
    d = start_deployment(
        request,
        model_path=model_path,
        backend="spectrum",
        common_args=["--dp-size", "2"],
        prefill_args=["--spectrum-budget", "1.0"],
        # SGLang's CPU path binds each rank to cores: one core per DP rank here
        prefill_env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1"},
        decode_env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1"},
        stats=True,
    )
    info = requests.get(f"http://127.0.0.1:{d.bootstrap_port}/spectrum/info", timeout=10).json()
    groups = {(r["system_dp_rank"], r["attn_tp_rank"]) for r in info["ranks"]}
    assert groups == {(0, 0), (1, 0)}, info["ranks"]
    for dp in (0, 1):
        for j, prompt in enumerate(BASELINE + PROMPTS):
            got = _pd_generate_on_dp_rank(d, prompt, f"dp{dp}-{j}", dp)
            assert got["text"] == reference[prompt], (dp, prompt, got["text"])
    stats = [s for s in d.spectrum_stats() if s["role"] == "prefill"]
    assert len(stats) == 8
    d.stop()
