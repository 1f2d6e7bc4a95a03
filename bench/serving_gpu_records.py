"""Records of bench/serving_gpu.py: the bench_serving arguments of a point, what its
output file and the servers' stats lines say, the record written to serving_gpu.json,
and the state file that lets a later call resume.

A record (one per config, prompt length and concurrency)::

    config, backend (mooncake|spectrum), kv_cache_dtype {prefill, decode}, link,
    budget (number | "auto" | None for mooncake), budget_mode (fixed|auto|None),
    min_budget, chosen_budget_mean, key_scales, tier_mode, input_len, concurrency,
    ttft_mean_ms, ttft_p50_ms, ttft_p99_ms, ttfts_ms (each request's), req_per_s, mean_e2e_ms,
    bytes_per_req, full_bytes_per_req (16-bit KV), bytes_ratio,
    pack_ms, transfer_ms, unpack_ms, link_gbps, queue_ms, parts, last_pack_ms,
    last_transfer_ms, part_profile (one request's parts), timeline_ms (median events),
    sglang_stage_ms (SGLang's own stages per role, median; set by the speed phase), paths,
    max_total_tokens {prefill, decode}, layer_group,
    prefill_tp, decode_tp, decode_dp, tp, hardware, num_prompts, completed, output_len,
    chunked_prefill_size, prefill_chunks, stats_records, bench_s

TTFT, req/s and e2e from bench_serving's output file; bytes, times and budgets are
medians (chosen budget: mean) over the point's prefill/decode stats lines, the bench's
warm-up request left out; link = sent bytes / transfer time. Mooncake writes no stats:
its bytes per request are the pool's bytes of the prompt (16-bit, or 8-bit for FP8).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import serving_gpu_configs as configs  # loaded by serving_gpu.py (bench/ is off sys.path)


def point_key(cfg: configs.Config, L: int, C: int, tp: int = 1) -> str:
    return f"{cfg.name}|{L}|{C}" + (f"|tp{tp}" if tp > 1 else "")


def bench_argv(
    url: str, model: str, L: int, C: int, output_len: int, num_prompts: int, out: Path
) -> list[str]:
    """``sglang.bench_serving`` arguments of one point (random token ids sent as ids,
    prefix cache flushed after the warm-up request)."""
    argv = ["--backend", "sglang", "--base-url", url, "--model", model, "--tokenizer", model]
    argv += ["--dataset-name", "random-ids", "--random-input-len", str(L)]
    argv += ["--random-output-len", str(output_len), "--random-range-ratio", "1.0"]
    argv += ["--num-prompts", str(num_prompts), "--max-concurrency", str(C)]
    argv += ["--tokenize-prompt", "--flush-cache", "--seed", str(1000 + L + C)]
    # --output-details: every request's TTFT too (the report's confidence intervals)
    return argv + ["--output-file", str(out), "--output-details", "--disable-tqdm"]


def read_result(out: Path) -> dict | None:
    """bench_serving's result: the last line of its output file."""
    try:
        return json.loads(out.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def result_problem(res: dict | None, num_prompts: int) -> str | None:
    """Why a point's result cannot be recorded (None: it can)."""
    if res is None:
        return "no result"
    if not int(res.get("completed") or 0):
        return "no request completed"
    if not res.get("median_ttft_ms"):  # bench_serving counts failed requests too
        return "requests failed (no TTFT)"
    return None


@dataclass
class Context:
    """What a record needs besides the point: the model's KV shape and the run."""

    model_config: dict
    num_prompts: int
    output_len: int
    chunked_prefill: int
    hardware: str
    tp: int = 1

    def full_bytes(self, L: int) -> int:
        c = self.model_config
        return L * 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2


def request_ttfts_ms(res: dict) -> list[float] | None:
    """The TTFT of every request that succeeded, in ms, sorted (bench_serving's
    ``--output-details`` lists, in seconds); None when the output has no details."""
    ttfts = res.get("ttfts")
    if not isinstance(ttfts, list):
        return None
    errors = res.get("errors") or [""] * len(ttfts)
    return sorted(round(t * 1e3, 2) for t, e in zip(ttfts, errors) if not e and t and t > 0)


TIMELINE = (  # a request's events, in order (request_timeline)
    "decode_granted",
    "prefill_created",
    "prefill_ready",
    "first_part",
    "prefill_sent",
    "decode_sent",
    "decode_ready",
    "decode_polled",
)


def request_timeline(dec: dict) -> dict[str, float] | None:
    """One request's events in ms after the decode created its receiver, from the decode's
    stats line (the prefill's rides in it; both servers on one host's clock): grant out,
    prefill sender created, every grant there, first part handed to the workers, Sent
    out, Sent in, KV in the pool, SGLang's poll saw it. None: a line without timeline."""
    pre, tl = dec.get("prefill") or {}, dec.get("timeline_ms")
    if not tl or "created_unix_ms" not in pre or "created_unix_ms" not in dec:
        return None
    ptl, profile = pre.get("timeline_ms") or {}, pre.get("part_profile") or []
    shift = pre["created_unix_ms"] - dec["created_unix_ms"]

    def at(v: float | None, base: float = 0.0) -> float | None:
        return None if v is None else round(base + v, 1)

    events = {
        "decode_granted": at(tl.get("granted")),
        "prefill_created": at(0.0, shift),
        "prefill_ready": at(ptl.get("ready"), shift),
        "first_part": at(profile[0][2] if profile else None, shift),
        "prefill_sent": at(ptl.get("sent"), shift),
        "decode_sent": at(tl.get("sent")),
        "decode_ready": at(tl.get("ready")),
        "decode_polled": at(tl.get("polled")),
    }
    return {k: v for k, v in events.items() if v is not None}


def median_timeline(dec: list[dict]) -> dict[str, float] | None:
    """Per event, the median over the point's requests of :func:`request_timeline`."""
    lines = [t for t in map(request_timeline, dec) if t]
    out = {}
    for k in TIMELINE:
        v = [t[k] for t in lines if k in t]
        if v:
            out[k] = round(statistics.median(v), 1)
    return out or None


# SGLang's per-request line (--enable-request-time-stats-logging, INFO; 0.5.17 and 0.5.23:
# managers/schedule_batch.py Req.log_time_stats, observability/req_time_stats.py)
_TIME_STATS_RE = re.compile(r"ReqTimeStats\(rid=.*?type=(\w+)\): (.*)$", re.M)
_DURATION_RE = re.compile(r"(\w+_duration)=([\d.]+)ms")


def sglang_stages(logs: dict[str, str]) -> dict[str, dict[str, float]] | None:
    """Per server role, the median over its ``ReqTimeStats`` lines in ``logs`` (role ->
    the log text of one point) of each stage SGLang times, in ms: the prefill's
    bootstrap, queue (waiting for a batch) and forward (until the request is done, its
    KV sent); the decode's bootstrap, alloc wait, transfer (waiting for the KV), queue
    (waiting for a decode batch) and forward (the decode steps). Both backends alike."""
    out = {}
    for role, text in logs.items():
        rows: dict[str, list[float]] = {}
        for kind, fields in _TIME_STATS_RE.findall(text):
            if kind != role:
                continue
            for key, ms in _DURATION_RE.findall(fields):
                rows.setdefault(key, []).append(float(ms))
        if rows:
            out[role] = {k: round(statistics.median(v), 1) for k, v in rows.items()}
            out[role]["requests"] = max(len(v) for v in rows.values())
    return out or None


def _med(rows: list[dict], k: str) -> float | None:
    v = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float))]
    return round(statistics.median(v), 3) if v else None


def make_record(
    cfg: configs.Config,
    L: int,
    C: int,
    res: dict,
    stats: list[dict],
    ctx: Context,
    max_tokens: dict | None = None,
) -> dict:
    """One point's record; with TP > 1 every rank writes a stats line per request
    (bytes per request: all ranks; times: medians over ranks and requests)."""
    tp = ctx.tp
    full = ctx.full_bytes(L)
    pre = [r for r in stats if r.get("role") == "prefill"]
    dec = [r for r in stats if r.get("role") == "decode"]
    keep = ctx.num_prompts * tp
    if len(pre) > keep:  # the bench's warm-up request came first
        warm = {r.get("room") for r in pre[: len(pre) - keep]}
        pre = pre[len(pre) - keep :]
        dec = [r for r in dec if r.get("room") not in warm]
    sent = [float(r["sent_bytes"]) * tp for r in pre if "sent_bytes" in r]
    rates = [
        r["sent_bytes"] * 8 / (r["transfer_ms"] * 1e6)
        for r in pre
        if r.get("transfer_ms") and r.get("sent_bytes")
    ]
    chosen = [float(r["chosen_budget_mean"]) for r in pre if "chosen_budget_mean" in r]
    if sent:
        nbytes = round(statistics.mean(sent))
    else:  # mooncake: the pool's bytes of the prompt
        nbytes = full // (2 if cfg.kv_dtype("prefill") == configs.FP8 else 1)
    key_scales = (pre[0].get("key_scales") if pre else None) or cfg.key_scales
    return {
        "config": cfg.name,
        "backend": cfg.transfer,
        "kv_cache_dtype": {"prefill": cfg.kv_dtype("prefill"), "decode": cfg.kv_dtype("decode")},
        "link": cfg.link,
        "budget": cfg.budget if cfg.spectrum else None,
        "budget_mode": cfg.budget_mode,
        "min_budget": cfg.min_budget,
        "chosen_budget_mean": round(statistics.mean(chosen), 4) if chosen else None,
        "key_scales": key_scales if cfg.spectrum else None,
        "tier_mode": pre[0].get("tier_mode") if pre else None,
        "input_len": L,
        "concurrency": C,
        "ttft_mean_ms": res.get("mean_ttft_ms"),
        "ttft_p50_ms": res.get("median_ttft_ms"),
        "ttft_p99_ms": res.get("p99_ttft_ms"),
        "ttfts_ms": request_ttfts_ms(res),
        "req_per_s": res.get("request_throughput"),
        "mean_e2e_ms": res.get("mean_e2e_latency_ms"),
        "bytes_per_req": nbytes,
        "full_bytes_per_req": full,
        "bytes_ratio": round(nbytes / full, 4),
        "pack_ms": _med(pre, "pack_ms"),
        "transfer_ms": _med(pre, "transfer_ms"),
        "unpack_ms": _med(dec, "unpack_ms"),
        "link_gbps": round(statistics.median(rates), 2) if rates else None,
        "queue_ms": _med(pre, "queue_ms"),
        "parts": _med(pre, "parts"),
        "last_pack_ms": _med(pre, "last_pack_ms"),
        "last_transfer_ms": _med(pre, "last_transfer_ms"),
        # one request's timeline (the middle stats record): per part tokens,
        # budget, submitted ms after arrival, queue, pack and write ms
        "part_profile": pre[len(pre) // 2].get("part_profile") if pre else None,
        # per event, the median ms after the decode created the request's receiver
        "timeline_ms": median_timeline(dec),
        "paths": sorted({str(r.get("path")) for r in pre}) if pre else None,
        "max_total_tokens": dict(max_tokens or {}),
        "layer_group": int(pre[0].get("layer_group", 0)) if pre else 0,
        "prefill_tp": tp,
        "decode_tp": tp,
        "decode_dp": 1,
        "tp": tp,
        "hardware": ctx.hardware,
        "num_prompts": ctx.num_prompts,
        "completed": res.get("completed"),
        "output_len": ctx.output_len,
        "chunked_prefill_size": ctx.chunked_prefill,
        "prefill_chunks": math.ceil(L / ctx.chunked_prefill),
        "stats_records": {"prefill": len(pre), "decode": len(dec)},
        "_key": point_key(cfg, L, C, tp),
    }


class State:
    """The state file (records, correctness and TP results, measured times, failures):
    written after every point, so a call that stops resumes in the next one."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}
        for k, v in (("records", []), ("correct", None), ("failed", {}), ("errors", [])):
            self.data.setdefault(k, v)

    def __getitem__(self, k):
        return self.data[k]

    def __setitem__(self, k, v) -> None:
        self.data[k] = v

    def get(self, k, default=None):
        return self.data.get(k, default)

    def done(self) -> set[str]:
        return {r["_key"] for r in self.data["records"] if isinstance(r.get("_key"), str)}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def records(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "_key"} for r in self.data["records"]]
