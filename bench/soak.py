"""Soak: a real PD deployment under churn, then every per-request table back to empty.

``spectrum`` prefill + decode + router on this machine (CPU, SmolLM2-135M, budget
0.5, chunked prefill 512 so long prompts go in parts). ``--requests`` requests
with random lengths in [``--min-len``, ``--max-len``] tokens at ``--concurrency``;
``--cancel-frac`` of them are cancelled by their client (the HTTP connection is
closed) at a random moment; at ``--restart-at`` of the run the decode server is
SIGKILLed and started again on the same ports (the requests in flight then fail
with a reason; clients hold new ones until it is back). Afterwards:

* every request was answered, failed with a reason, or cancelled by its client
  (``lost`` = none of these must be 0);
* token usage is 0 on both servers (``/v1/loads``);
* requests the prefill held for the killed decode are freed by SGLang's bootstrap
  timeout (``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``, ``--bootstrap-timeout-s``,
  shortened from 300 s to 120 s) and their rooms with them;
* every table of the backend (rooms, receivers, deferred grants, SGLang's status
  and failure tables, arena bytes in use, ``spectrumkv_state_entries`` on
  ``/metrics``) is back to its size before the run; tombstones of cleared rooms
  expire after 10 minutes and are reported separately.

Writes ``--out`` (JSON with a ``hardware`` field) and prints a table::

    python bench/soak.py                                  # 2000 requests (the benchmark)
    python bench/soak.py --requests 100 --concurrency 24 --max-len 1200 --budget auto  # CI variant
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from sglang_spectrum.models import ensure_model
from sglang_spectrum.sglang_plugin.launch import PDDeployment
from sglang_spectrum.sglang_plugin.metrics import parse_prometheus

ROOT = Path(__file__).resolve().parents[1]
STATE_METRIC = "spectrumkv_state_entries"
# state kinds that must return to their size before the run (tombstones expire later)
TRACKED = {
    "prefill": (
        "rooms",
        "request_status",
        "failure_records",
        "decode_prefix_len",
        "jobs_pending",
        "sends",
        "pipelined_rooms",
        "arena_in_use",
    ),
    "decode": ("receivers", "deferred", "request_status", "failure_records", "arena_in_use"),
}


def state(url: str, role: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    kinds = set(TRACKED[role]) | {"tombstones"}
    return {k: parse_prometheus(text, STATE_METRIC, kind=k) for k in sorted(kinds)}


def wait_state(d: PDDeployment, want: dict[str, dict[str, float]], timeout_s: float) -> dict:
    """Poll both servers until their tracked tables equal ``want`` (or time out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = {"prefill": state(d.prefill_url, "prefill"), "decode": state(d.decode_url, "decode")}
        same = all(now[r][k] == want[r][k] for r in TRACKED for k in TRACKED[r])
        if same or time.monotonic() > deadline:
            return now
        time.sleep(1.0)


def one_request(
    router: str, i: int, rng: random.Random, args: argparse.Namespace, vocab: int
) -> dict[str, Any]:
    n = rng.randint(args.min_len, args.max_len)
    ids = [rng.randrange(100, vocab) for _ in range(n)]
    cancel = rng.random() < args.cancel_frac
    body = {
        "input_ids": ids,
        "rid": f"soak-{i}",
        "sampling_params": {"temperature": 0.0, "max_new_tokens": args.max_new_tokens},
    }
    # a cancelled client gives up after a random moment (its connection closes)
    timeout = rng.uniform(0.05, 3.0) if cancel else args.request_timeout
    t0 = time.monotonic()
    try:
        r = requests.post(f"{router}/generate", json=body, timeout=timeout)
    except requests.exceptions.ReadTimeout:
        why = "" if cancel else f"no answer within the client's {timeout:.0f} s"
        return {"i": i, "len": n, "outcome": "cancelled" if cancel else "lost", "reason": why}
    except requests.exceptions.RequestException as e:
        return {"i": i, "len": n, "outcome": "failed", "reason": f"{type(e).__name__}: {e}"}
    s = time.monotonic() - t0
    if r.status_code == 200:
        meta = r.json().get("meta_info", {})
        finish = meta.get("finish_reason") or {}
        if finish.get("type") == "abort":
            return {"i": i, "len": n, "outcome": "failed", "reason": str(finish.get("message"))}
        ok = meta.get("completion_tokens", 0) > 0
        why = "" if ok else "HTTP 200 with no completion tokens"
        return {"i": i, "len": n, "outcome": "answered" if ok else "lost", "s": s, "reason": why}
    reason = r.text.strip()[:300]
    why = reason or f"HTTP {r.status_code} with an empty body"
    return {"i": i, "len": n, "outcome": "failed" if reason else "lost", "reason": why}


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = ensure_model("smollm2-135m")
    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    common = ["--enable-metrics", "--chunked-prefill-size", "512"]
    # SGLang's own bootstrap timeout (default 300 s) frees the prefill's requests whose
    # decode died before granting; shortened so the run settles in minutes
    timeout_env = {"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": str(args.bootstrap_timeout_s)}
    layer_args = ["--spectrum-layer-group", str(args.layer_group)] if args.layer_group else []
    d = PDDeployment(
        model,
        backend="spectrum",
        prefill_args=[*common, "--spectrum-budget", args.budget, *layer_args],
        decode_args=common,
        prefill_env=timeout_env,
        # 2 CPU cores serving 48 concurrent prompts answer health checks slowly: the router
        # must not take an overloaded (but working) decode for a dead one
        router_args=[
            "--disable-retries",
            "--disable-circuit-breaker",
            "--health-check-timeout-secs",
            "30",
            "--health-check-interval-secs",
            "10",
            "--health-failure-threshold",
            "10",
        ],  # fmt: skip
        log_dir=args.log_dir,
        stats=True,  # per-request records: how many requests went in layer groups
    )
    report: dict[str, Any] = {}
    try:
        d.start()
        before = {
            "prefill": state(d.prefill_url, "prefill"),
            "decode": state(d.decode_url, "decode"),
        }
        rng = random.Random(args.seed)
        seeds = [rng.randrange(1 << 30) for _ in range(args.requests)]
        restart_i = int(args.requests * args.restart_at) if args.restart_at > 0 else -1
        results: list[dict[str, Any]] = []
        restart_s: list[float] = []
        lock = threading.Lock()
        decode_up = threading.Event()
        decode_up.set()
        t0 = time.monotonic()

        def task(i: int) -> None:
            if i == restart_i:  # the decode dies mid-run and comes back on the same ports
                decode_up.clear()  # clients hold new requests meanwhile (in-flight ones fail)
                d.kill_decode()
                restart_s.append(d.restart_decode())
                decode_up.set()
            decode_up.wait()
            res = one_request(d.router_url, i, random.Random(seeds[i]), args, vocab)
            with lock:
                results.append(res)
                bar.update(1)

        with tqdm(total=args.requests, desc="soak", file=sys.stderr) as bar:
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(task, range(args.requests)))
        elapsed = time.monotonic() - t0
        idle = {
            "prefill": d.wait_idle(d.prefill_url, timeout_s=120),
            "decode": d.wait_idle(d.decode_url, timeout_s=120),
        }
        after = wait_state(d, before, timeout_s=args.settle_s)
        text = requests.get(f"{d.prefill_url}/metrics", timeout=10).text
        chosen_n = parse_prometheus(text, "spectrumkv_chosen_budget_count")
        chosen_sum = parse_prometheus(text, "spectrumkv_chosen_budget_sum")
        outcomes = Counter(r["outcome"] for r in results)
        reasons = Counter(r["reason"][:120] for r in results if r["outcome"] == "failed")
        lost = Counter(
            f"{r['reason']} (request {r['i']}, {r['len']} tokens)"
            for r in results
            if r["outcome"] == "lost"
        )
        report = {
            "bench": "soak",
            "hardware": f"{platform.machine()} CPU, {platform.node()}",
            "sglang": __import__("sglang").__version__,
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "log_dir")},
            "elapsed_s": round(elapsed, 1),
            "decode_restart_s": [round(x, 1) for x in restart_s],
            "outcomes": dict(outcomes),
            "failure_reasons": dict(reasons.most_common(10)),
            "lost": dict(lost.most_common(20)),
            "token_usage_after": idle,
            # requests sent (after the decode restart too) and their mean chosen budget
            "chosen_budget": {
                "requests": int(chosen_n),
                "mean": round(chosen_sum / chosen_n, 4) if chosen_n else None,
            },
            # prefill records (the requests it sent) and those sent in layer groups
            "layer_groups": _layer_group_counts(d.stats_path),
            "state_before": before,
            "state_after": after,
            "state_back_to_start": all(
                after[r][k] == before[r][k] for r in TRACKED for k in TRACKED[r]
            ),
        }
    finally:
        d.stop()
    return report


def _layer_group_counts(stats_file: Path) -> dict[str, int]:
    """Requests the prefill sent, those of them sent in layer groups, and the parts the
    decode unpacked as they landed, of all the parts it received."""
    rows = []
    if stats_file.exists():
        rows = [json.loads(line) for line in stats_file.read_text().splitlines() if line]
    sent = [r for r in rows if r.get("role") == "prefill"]
    received = [r for r in rows if r.get("role") == "decode"]
    return {
        "sent": len(sent),
        "in_layer_groups": sum(1 for r in sent if r.get("layer_group")),
        "parts_received": sum(r.get("parts", 0) for r in received),
        "parts_on_arrival": sum(r.get("parts_on_arrival", 0) for r in received),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1500)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--cancel-frac", type=float, default=0.1)
    p.add_argument("--restart-at", type=float, default=0.5, help="fraction of the run; 0 = none")
    p.add_argument("--budget", default="0.5", help="--spectrum-budget: a number or auto")
    p.add_argument(
        "--layer-group", type=int, default=0, help="--spectrum-layer-group of the prefill"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--settle-s", type=float, default=240.0)
    p.add_argument("--bootstrap-timeout-s", type=int, default=120)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    rows = [("requests", args.requests), ("elapsed s", report["elapsed_s"])]
    rows += [(f"outcome {k}", v) for k, v in sorted(report["outcomes"].items())]
    rows += [(f"token usage after ({r})", n) for r, n in report["token_usage_after"].items()]
    rows += [("chosen budget (mean)", report["chosen_budget"]["mean"])]
    groups = report["layer_groups"]
    rows += [("sent in layer groups", groups["in_layer_groups"])]
    rows += [
        ("parts unpacked on landing", f"{groups['parts_on_arrival']} of {groups['parts_received']}")
    ]
    rows += [("tables back to start", report["state_back_to_start"])]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"-> {args.out}")
    return report


if __name__ == "__main__":
    main()
