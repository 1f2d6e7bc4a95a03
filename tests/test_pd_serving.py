"""Lossless serving, prefix reuse, client aborts and DP on real PD deployments (slow).

One ``spectrum`` deployment at budget 1.0 (lossless: outputs must equal a
single non-disaggregated server's; every part written page to page,
``--spectrum-direct``) with the decode's radix cache on and the test-only transfer
delay for rids containing ``spectrum-delay``:

* lossless: the same prompts through the single server and the deployment give
  identical greedy outputs, every token travels at FP16 and is counted on both
  sides, a prompt-only secret comes back, the plugin ran in both schedulers.
  (SGLang 0.5.23's stock ``mooncake`` prefill cannot run on a CPU-only torch:
  it pins host memory and records CUDA events.)
* prefix reuse: the decode already holds a page-aligned prefix of the second
  prompt; the prefill packs and sends only the rest (importance scored over
  the whole prompt), and the answer is the single server's;
* a client abort while the transfer waits: the request ends once the prefill
  acknowledges (the decode holds the pages a direct write may land in until then),
  nothing lands afterwards (the next requests, whose KV reuses
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
NEW_TOKENS = 12
LOSSLESS_PROMPTS = [  # none shares more than a word with another test's prompt
    "The capital of Italy is",
    "def factorial(n):",
    "List three colors of the rainbow:",
    "Water boils at a temperature of",
    "A short story about a lighthouse keeper. " * 30 + "The keeper",
]
LOSSLESS_NEW_TOKENS = 24
LOSSLESS_SECRET = "48151623"
SECRET_PROMPT = (
    f"The secret code is {LOSSLESS_SECRET}. What is the secret code? Answer with the code only."
)
# SmolLM2-135M: 30 layers x (K,V) x 3 KV heads x 64 x 2 bytes per token
FULL_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2
DELAY_S = 6.0


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_model("smollm2-135m")


@pytest.fixture(scope="module")
def reference(request, model_path) -> dict[tuple[str, int], str]:
    """Greedy outputs of one non-disaggregated server, by (prompt, new tokens)."""
    single = SingleServer(model_path)
    request.addfinalizer(single.stop)
    single.start()
    asked = [(p, NEW_TOKENS) for p in PROMPTS + BASELINE]
    asked += [(p, LOSSLESS_NEW_TOKENS) for p in LOSSLESS_PROMPTS]
    try:
        return {(p, n): single.generate(p, n)["text"] for p, n in asked}
    finally:
        single.stop()


@pytest.fixture(scope="module")
def pd(request, model_path, reference) -> PDDeployment:
    return start_deployment(
        request,
        model_path=model_path,
        backend="spectrum",
        # the GPU-memory path end to end (under MC_FORCE_TCP the default stages on the host)
        common_args=["--spectrum-staging", "device"],
        prefill_args=["--spectrum-budget", "1.0"],
        decode_args=["--disaggregation-decode-enable-radix-cache"],
        prefill_env={"SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S": str(DELAY_S)},
        router_args=["--disable-retries"],
        stats=True,
    )


def _records(d: PDDeployment, rid: str) -> dict[str, dict]:
    return {s["role"]: s for s in d.spectrum_stats() if s["rid"] == rid}


def test_decode_prefix_reuse_sends_only_the_rest(pd, reference):
    for side in ("prefill", "decode"):
        log = pd.proc(side).log_path.read_text(errors="replace")
        assert "'staging': 'device'" in log and "host staging arena" not in log, side
    first = pd.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, rid="prefix-first")
    assert first["text"] == reference[(PROMPTS[0], NEW_TOKENS)]
    second = pd.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, rid="prefix-second")
    assert second["text"] == reference[(PROMPTS[1], NEW_TOKENS)]
    rec = _records(pd, "prefix-second")
    n = second["meta_info"]["prompt_tokens"]
    prefix = rec["decode"]["prefix_tokens"]
    assert prefix > 0, rec  # the decode reused its cached prefix
    assert rec["prefill"]["context_tokens"] == prefix  # scored over the whole prompt
    assert rec["prefill"]["num_tokens"] == n - prefix == rec["decode"]["num_tokens"]
    assert rec["decode"]["received_bytes"] == rec["prefill"]["sent_bytes"]
    assert _records(pd, "prefix-first")["decode"]["prefix_tokens"] == 0


def test_whole_prompt_cached_on_decode_sends_no_kv(pd, reference):
    """The decode's radix cache holds the whole prompt (asked twice): SGLang's prefill
    sends 0 pages; the backend sends no KV, only ``Sent`` and the metadata row, and the
    answer is the single server's."""
    prompt = BASELINE[1]
    for rid in ("cached-first", "cached-again"):
        got = pd.generate(prompt, max_new_tokens=NEW_TOKENS, rid=rid)
        assert got["text"] == reference[(prompt, NEW_TOKENS)], (rid, got["text"])
    rec = _records(pd, "cached-again")
    n = got["meta_info"]["prompt_tokens"]
    assert rec["decode"]["prefix_tokens"] == n, rec
    assert rec["prefill"]["num_tokens"] == 0 == rec["decode"]["num_tokens"], rec
    assert rec["prefill"]["sent_bytes"] == 0 == rec["decode"]["received_bytes"], rec
    assert pd.wait_idle(pd.prefill_url) == 0 and pd.wait_idle(pd.decode_url) == 0


def test_client_abort_during_transfer_leaves_nothing_behind(pd, reference):
    rid = "abort-spectrum-delay-1"
    prompt = "Abort me. " + FILLER * 20 + "End."
    thread, result = start_delayed_request(pd, prompt, rid, 8, 120)
    delayed_at = time.monotonic()  # the direct write of its pages lands DELAY_S from now
    plog = pd.proc("prefill").log_path
    r = requests.post(f"{pd.decode_url}/abort_request", json={"rid": rid}, timeout=10)
    assert r.status_code == 200
    thread.join(timeout=120)
    # the decode kept the request's pages (SGLang frees them once it ends) until the
    # prefill acknowledged, after its delayed write: no write can land in reused pages
    assert time.monotonic() - delayed_at >= DELAY_S - 1.0
    # the client got no answer built from that KV
    if "r" in result:
        assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort", result
    time.sleep(DELAY_S + 2)  # past the delayed write
    assert "aborted room" in plog.read_text(errors="replace")
    assert "decode" not in _records(pd, rid)  # never unpacked
    assert pd.wait_idle(pd.prefill_url) == 0 and pd.wait_idle(pd.decode_url) == 0
    for prompt in BASELINE:  # their KV reuses the freed slots: exactly as before
        got = pd.generate(prompt, max_new_tokens=NEW_TOKENS)["text"]
        assert got == reference[(prompt, NEW_TOKENS)]


# (after the prefix test: the decode's radix cache must start empty there)
@pytest.fixture(scope="module")
def lossless(pd) -> dict:
    """The lossless prompts through the deployment: texts, the secret's answer, the
    records of those requests and both servers' logs."""
    rids = [f"lossless-{j}" for j in range(len(LOSSLESS_PROMPTS))]
    texts = []
    for rid, prompt in zip(rids, LOSSLESS_PROMPTS):
        r = pd.generate(prompt, max_new_tokens=LOSSLESS_NEW_TOKENS, rid=rid)
        assert r["meta_info"]["completion_tokens"] > 0
        texts.append(r["text"])
    return {
        "texts": texts,
        "secret_answer": pd.chat(SECRET_PROMPT, max_tokens=16),
        "stats": [s for s in pd.spectrum_stats() if s["rid"] in rids],
        "logs": {p.name: p.log_path.read_text(errors="replace") for p in pd.procs},
    }


def test_budget_1_outputs_identical_to_single_server(lossless, reference):
    single = [reference[(p, LOSSLESS_NEW_TOKENS)] for p in LOSSLESS_PROMPTS]
    assert all(t.strip() for t in single), single
    assert lossless["texts"] == single


def test_prompt_only_secret_comes_back(lossless):
    assert LOSSLESS_SECRET in lossless["secret_answer"], lossless["secret_answer"]


def test_budget_1_is_lossless_and_counted(lossless):
    records = lossless["stats"]
    prefill = [r for r in records if r["role"] == "prefill"]
    decode = {r["rid"]: r for r in records if r["role"] == "decode"}
    assert len(prefill) == len(LOSSLESS_PROMPTS)
    for r in prefill:
        assert (
            r["tiers"]["int8"] == r["tiers"]["int4"] == 0 and r["tiers"]["fp16"] == r["num_tokens"]
        )
        assert r["num_tokens"] * FULL_BYTES_PER_TOKEN == r["full_bytes"]
        assert decode[r["rid"]]["received_bytes"] == r["sent_bytes"]
        # page to page (--spectrum-direct auto): the pool's own bytes, nothing unpacked
        assert r["path"] == "direct" and r["sent_bytes"] == r["full_bytes"]
        assert decode[r["rid"]]["direct_tokens"] == r["num_tokens"]


def test_spectrum_plugin_active_in_scheduler_processes(lossless):
    logs = lossless["logs"]
    for side in ("prefill", "decode"):
        assert f"SpectrumKV {side}: KV pool MHATokenToKVPool" in logs[side]
    assert "send arena" in logs["prefill"] and "receive arena" in logs["decode"]
    for side in ("prefill", "decode"):  # --spectrum-direct auto, CPU pools
        assert (
            f"SpectrumKV {side}: KV pool registered: lossless parts go page to page" in logs[side]
        )
    # the decode checked the prefill's version, layout and tier mode at bootstrap
    assert "SpectrumKV: prefill at" in logs["decode"] and "verified (layout" in logs["decode"]
    assert "'budget': 1.0" in logs["decode"]


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


def _two_ranks_in_layer_groups(request, model_path, parallel_flag: str) -> PDDeployment:
    """Both servers with ``parallel_flag`` 2 (``--dp-size`` or ``--tp-size``), budget 1.0
    packed (``--spectrum-direct off``), the prefill in layer groups of 8."""
    bind = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}  # SGLang's CPU path: one core a rank
    return start_deployment(
        request,
        model_path=model_path,
        backend="spectrum",
        common_args=[parallel_flag, "2", "--spectrum-direct", "off"],
        prefill_args=["--spectrum-budget", "1.0", "--spectrum-layer-group", "8"],
        prefill_env=bind,
        decode_env=dict(bind),
        stats=True,
    )


def test_data_parallel_prefill_and_decode_answer_like_a_single_server(
    request, model_path, reference
):
    """--dp-size 2 (no DP attention) on both servers: every prefill DP rank registers
    at the bootstrap server under its own DP group (the decode waits for all of them),
    and requests on either prefill DP rank answer exactly like one server (budget 1.0,
    packed: ``--spectrum-direct off``), each sent in layer groups by its own DP
    scheduler (``--spectrum-layer-group 8``: the hooks run in every scheduler process).

    SGLang's sender checks ``attn_dp_rank == room % dp_size`` unless the request names
    its prefill DP rank; without DP attention every DP scheduler has attn_dp_rank 0, so
    a router must name the rank (sglang-router 0.3.2's --dp-aware refuses our
    loopback workers: "resolve_deny"). The requests are posted as such a router does."""
    d = _two_ranks_in_layer_groups(request, model_path, "--dp-size")
    info = requests.get(f"http://127.0.0.1:{d.bootstrap_port}/spectrum/info", timeout=10).json()
    groups = {(r["system_dp_rank"], r["attn_tp_rank"]) for r in info["ranks"]}
    assert groups == {(0, 0), (1, 0)}, info["ranks"]
    # one short and one long prompt on each DP rank, the two ranks served at once
    prompts = [BASELINE[1], PROMPTS[0]]
    with ThreadPoolExecutor(2) as pool:
        for j, prompt in enumerate(prompts):
            futures = {
                dp: pool.submit(_pd_generate_on_dp_rank, d, prompt, f"dp{dp}-{j}", dp)
                for dp in (0, 1)
            }
            for dp, f in futures.items():
                got = f.result()
                assert got["text"] == reference[(prompt, NEW_TOKENS)], (dp, prompt, got["text"])
    stats = [s for s in d.spectrum_stats() if s["role"] == "prefill"]
    assert len(stats) == 2 * len(prompts)
    assert {s["path"] for s in stats} == {"torch"}  # CPU pools: the torch reference packs
    # SmolLM2's 30 layers in groups of 8: 4 parts a request, each alone in its batch
    assert all(s["layer_group"] == 8 and s["parts"] == 4 for s in stats), stats
    d.stop()


def test_tensor_parallel_layer_groups_answer_like_a_single_server(request, model_path, reference):
    """--tp-size 2 on both servers with --spectrum-layer-group 8 at budget 1.0 (packed:
    ``--spectrum-direct off``): every TP rank's scheduler runs the layer hooks on its own
    heads, sends its rows in 4 layer groups to its decode rank, which unpacks each as it
    lands; the greedy answers equal the single server's (SmolLM2's 3 KV heads: SGLang
    replicates them over the two ranks)."""
    d = _two_ranks_in_layer_groups(request, model_path, "--tp-size")
    for j, prompt in enumerate(BASELINE):
        got = d.generate(prompt, max_new_tokens=NEW_TOKENS, rid=f"tp-{j}")
        assert got["text"] == reference[(prompt, NEW_TOKENS)], (prompt, got["text"])
    stats = [s for s in d.spectrum_stats() if s["rid"].startswith("tp-")]
    pre = [s for s in stats if s["role"] == "prefill"]
    dec = [s for s in stats if s["role"] == "decode"]
    assert sorted((s["rid"], s["tp_rank"]) for s in pre) == [
        (f"tp-{j}", r) for j in range(len(BASELINE)) for r in (0, 1)
    ]
    assert all(s["layer_group"] == 8 and s["parts"] == 4 for s in pre), pre
    assert all(s["tiers"]["int8"] == s["tiers"]["int4"] == 0 for s in pre + dec), stats
    assert len(dec) == len(pre) and all(s["parts_on_arrival"] == 4 for s in dec), dec
    d.stop()
