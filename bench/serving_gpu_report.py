"""Outputs of bench/serving_gpu.py: the stats-file reader, the markdown tables, the
console summary and the TTFT-against-length plot (records as serving_gpu.json holds)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path | None) -> list[dict]:
    if path is None:
        return []
    try:
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        return []


def per_rank(stats: list[dict]) -> dict:
    """Per TP rank and role: requests, KV heads, mean bytes sent/received and of the
    16-bit KV, mean parts, from one pair's stats lines."""
    out: dict = {}
    for r in stats:
        key = f"{r.get('role')}_rank{r.get('tp_rank', 0)}"
        d = out.setdefault(key, {"requests": 0, "bytes": 0, "full_bytes": 0, "parts": 0})
        d["requests"] += 1
        d["kv_heads"] = r.get("kv_heads")
        d["bytes"] += int(r.get("sent_bytes", r.get("received_bytes", 0)))
        d["full_bytes"] += int(r.get("full_bytes", 0))
        d["parts"] += int(r.get("parts", 1))
    for d in out.values():
        n = max(d["requests"], 1)
        d["mean_bytes"], d["mean_full_bytes"] = d.pop("bytes") // n, d.pop("full_bytes") // n
        d["mean_parts"] = round(d.pop("parts") / n, 2)
    return dict(sorted(out.items()))


def _f(v, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def label(r: dict) -> str:
    tp = f", TP {r['tp']}" if r.get("tp", 1) > 1 else ""
    if r["backend"] != "spectrum":
        return r["backend"] + tp
    ks = f", {r['key_scales']} keys" if r.get("key_scales") else ""
    return f"spectrum b={r['budget']:g}{ks}{tp}"


def markdown(recs: list[dict], correct: dict | None, tp: dict | None = None) -> str:
    lines = ["# SGLang PD serving on the GPU: spectrum against mooncake", ""]
    if recs:
        lines += [f"Hardware: {recs[0]['hardware']}.", ""]
        lines += [
            "| backend | input | conc | TTFT mean | p50 | p99 ms | vs mooncake p50 | req/s "
            "| MiB/req | parts | pack | transfer | unpack ms | link Gb/s | path |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = {
            (r["input_len"], r["concurrency"], r.get("tp", 1)): r["ttft_p50_ms"]
            for r in recs
            if r["backend"] == "mooncake"
        }
        for r in sorted(
            recs, key=lambda r: (r.get("tp", 1), r["input_len"], r["concurrency"], label(r))
        ):
            b = base.get((r["input_len"], r["concurrency"], r.get("tp", 1)))
            rel = f"{r['ttft_p50_ms'] / b:.2f}x" if b and r["ttft_p50_ms"] else "-"
            lines.append(
                f"| {label(r)} | {r['input_len']} | {r['concurrency']} | {_f(r['ttft_mean_ms'])} "
                f"| {_f(r['ttft_p50_ms'])} | {_f(r['ttft_p99_ms'])} | {rel} "
                f"| {_f(r['req_per_s'], '.2f')} | {_f(r['bytes_per_req'] / 2**20, '.0f')} "
                f"| {_f(r.get('parts'), 'g')} | {_f(r['pack_ms'], '.1f')} "
                f"| {_f(r['transfer_ms'], '.1f')} "
                f"| {_f(r['unpack_ms'], '.1f')} | {_f(r['link_gbps'], '.1f')} "
                f"| {','.join(r.get('paths') or []) or '-'} |"
            )
        lines.append("")
    if correct:
        lines += ["## Correctness (SmolLM2-135M, real weights)", ""]
        if correct.get("error"):
            lines += [f"Failed: `{correct['error'][:500]}`", ""]
        for k in ("b1_identical_to_single", "secret_single", "paths"):
            if k in correct:
                lines.append(f"- {k}: {correct[k]}")
        for b in correct.get("budgets", []):
            if f"secret_b{b:g}" in correct:
                lines.append(f"- secret_b{b:g}: {correct[f'secret_b{b:g}']}")
        lines.append("")
    if tp:
        lines += [f"## Tensor parallelism (TP {tp.get('tp')}, {tp.get('model')})", ""]
        lines += [f"Hardware: {tp.get('hardware')}.", ""]
        if tp.get("error"):
            lines += [f"Failed: `{tp['error'][:500]}`", ""]
        for k in ("b1_identical_to_single", "b0.5_identical_to_single"):
            if k in tp:
                lines.append(f"- {k}: {tp[k]}")
        if "mooncake_identical_to_single" in tp:
            lines.append(f"- mooncake_identical_to_single: {tp['mooncake_identical_to_single']}")
        for name, ranks in (tp.get("per_rank") or {}).items():
            lines.append(f"- {name} per rank: {ranks}")
        lines.append("")
    return "\n".join(lines)


def summary(recs: list[dict], correct: dict | None) -> str:
    out = ["", "=== serving_gpu summary ==="]
    if correct:
        out.append(
            f"correct: b1 identical {correct.get('b1_identical_to_single')}, secret single "
            f"{correct.get('secret_single')}, "
            + ", ".join(
                f"b{b:g} {correct.get(f'secret_b{b:g}')}" for b in correct.get("budgets", [])
            )
            + f", paths {correct.get('paths')}"
            + (f", ERROR {correct['error'][:200]}" if correct.get("error") else "")
        )
    out.append(f"{'backend':28} {'L':>6} {'C':>2} {'p50':>7} {'p99':>7} {'req/s':>6} {'MiB':>6}")
    for r in sorted(recs, key=lambda r: (r["input_len"], r["concurrency"], label(r))):
        out.append(
            f"{label(r):28} {r['input_len']:>6} {r['concurrency']:>2} {_f(r['ttft_p50_ms']):>7} "
            f"{_f(r['ttft_p99_ms']):>7} {_f(r['req_per_s'], '.2f'):>6} "
            f"{r['bytes_per_req'] / 2**20:>6.0f}"
        )
    return "\n".join(out)


def plot(recs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in recs:
        groups.setdefault((label(r), r["concurrency"]), []).append(r)
    for (lab, c), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["input_len"])
        ax.plot(
            [r["input_len"] for r in rows],
            [r["ttft_p50_ms"] for r in rows],
            marker="o",
            linestyle="-" if c == 1 else "--",
            label=f"{lab}, concurrency {c}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title(f"PD TTFT, {recs[0]['hardware'].split(';')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _key(r: dict) -> tuple:
    return (
        r["backend"],
        r["budget"],
        r.get("key_scales"),
        r["input_len"],
        r["concurrency"],
        r.get("tp", 1),
    )


def main(argv: list[str] | None = None) -> int:
    """Merge the outputs of several bench/serving_gpu.py calls (a later file's record
    replaces an earlier one of the same point; records without a TTFT are dropped) and
    write serving_gpu.json / .md / .png into --out."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("records", nargs="+", type=Path, help="serving_gpu.json files, in order")
    ap.add_argument("--correct", type=Path, help="serving_gpu_correct.json")
    ap.add_argument("--tp", type=Path, help="serving_gpu_tp.json")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    merged: dict[tuple, dict] = {}
    for path in a.records:
        for r in json.loads(path.read_text()):
            if r.get("ttft_p50_ms"):
                merged[_key(r)] = r
            else:
                print(f"{path}: {_key(r)} has no TTFT (failed point): dropped")
    recs = sorted(merged.values(), key=lambda r: (r.get("tp", 1), r["input_len"], r["concurrency"]))
    correct = json.loads(a.correct.read_text()) if a.correct else None
    tp = json.loads(a.tp.read_text()) if a.tp else None
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "serving_gpu.json").write_text(json.dumps(recs, indent=1) + "\n")
    (a.out / "serving_gpu.md").write_text(markdown(recs, correct, tp))
    plot(recs, a.out / "serving_gpu.png")
    print(summary(recs, correct))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
