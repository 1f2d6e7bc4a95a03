"""Serving benchmark: ``sglang.bench_serving`` against the PD router, mooncake vs spectrum.

For each configuration a fresh PD deployment (prefill + decode + router, the
``launch`` module of the plugin) serves the same ``random`` workload (long
inputs, short outputs; prompts cut from WikiText-2 in a local ShareGPT-format
file, so nothing is downloaded). TTFT and throughput come from bench_serving;
the bytes that crossed Mooncake come from the servers' ``/metrics``
(``spectrumkv_sent_bytes_total`` on prefill, ``spectrumkv_received_bytes_total``
on decode); mooncake moves every prompt token at 16 bit, i.e. its bytes are
``input tokens x layers x 2 x kv_heads x head_dim x 2``.

    .venv/bin/python bench/serving.py            # writes bench/results/serving.json + serving.md

``sglang.benchmark`` imports HF ``datasets`` at module level (for MMMU) although
the random dataset does not use it; when ``datasets`` is not installed the
benchmark runs with a stub module in its place (:data:`SHIM`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sglang_spectrum.sglang_plugin.launch import PDDeployment  # noqa: E402

CONFIGS = {
    "mooncake": ("mooncake", []),
    "spectrum-b0.5": ("spectrum", ["--spectrum-budget", "0.5", "--spectrum-tiers", "3"]),
    "spectrum-b0.3": ("spectrum", ["--spectrum-budget", "0.3", "--spectrum-tiers", "3"]),
}
SHIM = """
import runpy, sys, types
try:
    import datasets  # noqa: F401
except ImportError:
    stub = types.ModuleType("datasets")
    def load_dataset(*args, **kwargs):
        raise RuntimeError("HF datasets is not installed")
    stub.load_dataset = load_dataset
    sys.modules["datasets"] = stub
sys.argv = ["sglang.bench_serving"] + sys.argv[1:]
runpy.run_module("sglang.bench_serving", run_name="__main__")
"""


def make_sharegpt_file(path: Path, n: int = 200) -> Path:
    """A ShareGPT-format JSON of WikiText-2 passages (the random dataset's text source)."""
    from sglang_spectrum.eval.ppl import load_wikitext

    text = load_wikitext()
    paras = [p.strip() for p in text.split("\n") if len(p.strip()) > 400]
    rows = [
        {
            "conversations": [
                {"from": "human", "value": paras[i % len(paras)]},
                {"from": "gpt", "value": "ok"},
            ]
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return path


def kv_bytes_per_token(model_path: Path) -> int:
    cfg = json.loads(Path(model_path, "config.json").read_text())
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * heads * head_dim * 2


def counters(d: PDDeployment) -> dict[str, float]:
    if d.backend != "spectrum":
        return {}
    return {
        "sent": d.metric(d.prefill_url, "spectrumkv_sent_bytes_total", role="prefill"),
        "full": d.metric(d.prefill_url, "spectrumkv_full_bytes_total", role="prefill"),
        "received": d.metric(d.decode_url, "spectrumkv_received_bytes_total", role="decode"),
        "transfers": d.metric(
            d.prefill_url, "spectrumkv_requests_total", role="prefill", outcome="ok"
        ),
        "pack_s": d.metric(d.prefill_url, "spectrumkv_pack_seconds_sum", role="prefill"),
        "transfer_s": d.metric(d.prefill_url, "spectrumkv_transfer_seconds_sum", role="prefill"),
        "unpack_s": d.metric(d.decode_url, "spectrumkv_unpack_seconds_sum", role="decode"),
    }


def run_config(name: str, args: argparse.Namespace, model_path: Path, data: Path) -> dict:
    backend, extra = CONFIGS[name]
    out_dir = Path(args.work_dir, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = PDDeployment(
        model_path,
        backend=backend,
        prefill_args=extra,
        common_args=["--enable-metrics"],
        # the router is not under test: on an overloaded CPU a slow /health must not
        # take a worker out of rotation (default: 3 timeouts -> "no available workers")
        router_args=[
            "--disable-circuit-breaker",
            "--health-check-timeout-secs",
            "60",
            "--health-failure-threshold",
            "100",
            "--disable-retries",
        ],  # fmt: skip
        log_dir=out_dir,
    )
    bench_cmd = [
        sys.executable, "-c", SHIM,
        "--backend", "sglang",
        "--base-url", "",  # set below
        "--model", str(model_path),
        "--tokenizer", str(model_path),
        "--dataset-name", "random",
        "--dataset-path", str(data),
        "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len),
        "--random-range-ratio", str(args.range_ratio),
        "--num-prompts", str(args.num_prompts),
        "--request-rate", str(args.request_rate),
        "--seed", str(args.seed),
        *(["--max-concurrency", str(args.max_concurrency)] if args.max_concurrency else []),
        "--warmup-requests", "1",
        "--disable-tqdm",
        "--output-file", str(out_dir / "bench_serving.jsonl"),
    ]  # fmt: skip
    try:
        d.start()
        print(f"[{name}] deployment ready in {d.startup_s:.0f} s ({out_dir})", flush=True)
        before = counters(d)
        bench_cmd[bench_cmd.index("--base-url") + 1] = d.router_url
        t0 = time.monotonic()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(out_dir / "bench_serving.log", "w") as log:
            subprocess.run(bench_cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        wall = time.monotonic() - t0
        after = counters(d)
    finally:
        d.stop()
    lines = (out_dir / "bench_serving.jsonl").read_text().strip().splitlines()
    res = json.loads(lines[-1])
    res.pop("server_info", None)
    per_token = kv_bytes_per_token(model_path)
    row: dict[str, Any] = {
        "config": name,
        "backend": backend,
        "server_args": extra,
        "startup_s": round(d.startup_s, 1),
        "bench_wall_s": round(wall, 1),
        "completed": res["completed"],
        "total_input_tokens": res["total_input_tokens"],
        "total_output_tokens": res["total_output_tokens"],
        "mean_ttft_ms": res["mean_ttft_ms"],
        "median_ttft_ms": res["median_ttft_ms"],
        "p99_ttft_ms": res["p99_ttft_ms"],
        "mean_e2e_latency_ms": res["mean_e2e_latency_ms"],
        "request_throughput": res["request_throughput"],
        "input_throughput": res["input_throughput"],
        "output_throughput": res["output_throughput"],
        "full_bytes_per_request": res["total_input_tokens"] * per_token / res["completed"],
    }
    if backend == "spectrum":
        delta = {k: after[k] - before[k] for k in after}
        n = max(delta["transfers"], 1)  # bench requests + its warmup request
        row.update(
            bytes_per_request=delta["sent"] / n,
            received_bytes_per_request=delta["received"] / n,
            measured_full_bytes_per_request=delta["full"] / n,
            bytes_ratio=delta["sent"] / delta["full"] if delta["full"] else None,
            transfers=int(delta["transfers"]),
            mean_pack_ms=1e3 * delta["pack_s"] / n,
            mean_transfer_ms=1e3 * delta["transfer_s"] / n,
            mean_unpack_ms=1e3 * delta["unpack_s"] / n,
        )
    else:
        row.update(bytes_per_request=row["full_bytes_per_request"], bytes_ratio=1.0)
    return row


def write_markdown(results: dict, path: Path, append: bool = False) -> None:
    rows = results["runs"]
    base = next(r for r in rows if r["backend"] == "mooncake")
    w = results["workload"]
    lines = [
        f"# Serving benchmark: mooncake vs spectrum (CPU, SmolLM2-135M){results['title']}",
        "",
        f"`sglang.bench_serving` against the PD router; random dataset (WikiText-2 text),"
        f" {w['num_prompts']} prompts, input {w['input_range'][0]}-{w['input_range'][1]}"
        f" tokens, output {w['output_range'][0]}-{w['output_range'][1]} tokens,"
        f" {w['request_rate']} req/s, max concurrency {w.get('max_concurrency') or '-'},"
        f" seed {w['seed']}; a 2-core CPU shared with other jobs."
        " Command: see bench/README.md (Serving).",
        "",
        "| config | bytes/request | bytes ratio | mean TTFT ms | median TTFT ms | p99 TTFT ms"
        " | req/s | input tok/s | output tok/s | pack ms | transfer ms | unpack ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x: Any, fmt: str = ".1f") -> str:
        return "-" if x is None else format(x, fmt)

    for r in rows:
        lines.append(
            f"| {r['config']} | {r['bytes_per_request']:,.0f} | {f(r['bytes_ratio'], '.3f')}"
            f" | {f(r['mean_ttft_ms'])} | {f(r['median_ttft_ms'])} | {f(r['p99_ttft_ms'])}"
            f" | {f(r['request_throughput'], '.3f')} | {f(r['input_throughput'])}"
            f" | {f(r['output_throughput'], '.2f')} | {f(r.get('mean_pack_ms'))}"
            f" | {f(r.get('mean_transfer_ms'))} | {f(r.get('mean_unpack_ms'))} |"
        )
    lines += [
        "",
        "Ratios spectrum / mooncake:",
        "",
        "| config | bytes/request | mean TTFT | median TTFT | req/s | output tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r is base:
            continue
        lines.append(
            f"| {r['config']} | {r['bytes_per_request'] / base['bytes_per_request']:.3f}"
            f" | {r['mean_ttft_ms'] / base['mean_ttft_ms']:.3f}"
            f" | {r['median_ttft_ms'] / base['median_ttft_ms']:.3f}"
            f" | {r['request_throughput'] / base['request_throughput']:.3f}"
            f" | {r['output_throughput'] / base['output_throughput']:.3f} |"
        )
    lines += ["", results.get("notes", ""), ""]
    if append and path.exists():
        lines[0] = "#" + lines[0]  # a subsection of the existing file
        path.write_text(path.read_text() + "\n" + "\n".join(lines))
    else:
        path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    from sglang_spectrum.models import ensure_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--input-len", type=int, default=1536)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--range-ratio", type=float, default=0.67)
    p.add_argument("--request-rate", type=float, default=0.1)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/spectrumkv-bench-serving")
    p.add_argument("--out", default=str(REPO / "bench/results/serving.json"))
    p.add_argument("--md", default=str(REPO / "bench/serving.md"))
    p.add_argument("--md-append", action="store_true", help="append to --md instead")
    args = p.parse_args(argv)
    model_path = ensure_model(args.model)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    data = make_sharegpt_file(Path(args.work_dir, "wikitext_sharegpt.json"))
    runs = []
    for name in args.configs.split(","):
        runs.append(run_config(name, args, model_path, data))
        print(json.dumps(runs[-1], indent=1), flush=True)
    lo = lambda n: max(1, int(n * args.range_ratio))  # bench_serving's compute_random_lens
    mode = (
        f", closed loop, {args.max_concurrency} at a time"
        if args.max_concurrency
        else f", open loop at {args.request_rate} req/s"
    )
    results = {
        "title": mode,
        "model": args.model,
        "workload": {
            "dataset": "random (WikiText-2 passages, local ShareGPT-format file)",
            "num_prompts": args.num_prompts,
            "input_range": [lo(args.input_len), args.input_len],
            "output_range": [lo(args.output_len), args.output_len],
            "request_rate": args.request_rate,
            "max_concurrency": args.max_concurrency,
            "seed": args.seed,
        },
        "command": "python bench/serving.py " + " ".join(argv or sys.argv[1:]),
        "runs": runs,
        "notes": (
            "bytes/request: mooncake = 16-bit KV of the prompt (what it moves); spectrum ="
            " packed bytes written over Mooncake, from spectrumkv_sent_bytes_total (the"
            " decode's spectrumkv_received_bytes_total agrees), averaged over the benchmark's"
            " requests and its warmup request. TTFT on this CPU is dominated by the prefill"
            " forward; pack/unpack run on the scheduler threads (torch reference codec)."
        ),
    }
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1))
    write_markdown(results, Path(args.md), append=args.md_append)
    print(f"wrote {out} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
