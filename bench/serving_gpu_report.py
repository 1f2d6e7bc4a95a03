"""Outputs of bench/serving_gpu.py: the stats-file reader, the markdown tables, the
console summary and the TTFT plot (records as serving_gpu.json holds), and the merge of
several calls' outputs (``main``). Standalone: needs no other bench module.

Per (TP, link, prompt length, concurrency) every config's TTFT p50 is shown with its
ratio to stock ``mooncake`` and to ``mooncake-fp8`` on the same link from the same
records; a second table gives each config's KV capacity (SGLang's max_total_num_tokens
of the prefill and the decode). Records of earlier versions (no ``config`` field) read
as bf16 pools over TCP.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

BASELINES = ("mooncake", "mooncake-fp8")
CI_LEVEL = 0.95
CI_RESAMPLES = 2000


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


def config_name(r: dict) -> str:
    """The record's config (``NAME[:BUDGET[:KEYS]]@LINK``; older records rebuilt)."""
    if r.get("config"):
        return r["config"]
    if r["backend"] != "spectrum":
        return f"{r['backend']}@tcp"
    ks = f":{r['key_scales']}" if r.get("key_scales") else ""
    return f"spectrum:{r['budget']:g}{ks}@tcp"


def kind(r: dict) -> str:
    return config_name(r).split("@")[0].split(":")[0]


def link(r: dict) -> str:
    return r.get("link") or "tcp"


def label(r: dict) -> str:
    tp = f", TP {r['tp']}" if r.get("tp", 1) > 1 else ""
    return config_name(r) + tp


def _order(r: dict) -> tuple:
    k = kind(r)
    return (BASELINES.index(k) if k in BASELINES else len(BASELINES), config_name(r))


def _point(r: dict) -> tuple:
    rank = {"tcp": 0, "nvlink": 2}.get(link(r), 1)  # tcpslice=N between
    return (r.get("tp", 1), rank, link(r), r["input_len"], r["concurrency"])


def baselines(recs: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(TP, link, length, concurrency) -> {baseline kind: its record}."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in recs:
        if kind(r) in BASELINES and r.get("ttft_p50_ms"):
            out.setdefault(_point(r), {})[kind(r)] = r
    return out


def ratios(r: dict, base: dict[tuple, dict[str, dict]]) -> list[float | None]:
    """TTFT p50 over each baseline's at the same point (None: no baseline there)."""
    b = base.get(_point(r), {})
    return [
        r["ttft_p50_ms"] / b[k]["ttft_p50_ms"] if k in b and r.get("ttft_p50_ms") else None
        for k in BASELINES
    ]


def ratio_cells(r: dict, base: dict[tuple, dict[str, dict]]) -> list[str]:
    """Per baseline: ``0.35x`` and, where both records list their requests, the 95 %
    interval of that ratio (``0.35x (0.31-0.38)``)."""
    b = base.get(_point(r), {})
    cells = []
    for k, x in zip(BASELINES, ratios(r, base)):
        if x is None:
            cells.append("-")
            continue
        ci = ratio_ci(r, b[k]) if b[k] is not r else None
        cells.append(f"{x:.2f}x" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""))
    return cells


def _bootstrap(stat, samples: list[list[float]], seed: int) -> tuple[float, float] | None:
    """Percentile bootstrap interval (``CI_LEVEL``) of ``stat(*samples)``, each sample
    resampled on its own with replacement; None when a sample has fewer than 5 values."""
    if any(len(x) < 5 for x in samples):
        return None
    rng = random.Random(seed)
    vals = sorted(stat(*(rng.choices(x, k=len(x)) for x in samples)) for _ in range(CI_RESAMPLES))
    tail = (1 - CI_LEVEL) / 2
    return vals[int(tail * CI_RESAMPLES)], vals[int((1 - tail) * CI_RESAMPLES) - 1]


def p50_ci(r: dict) -> tuple[float, float] | None:
    """95 % interval of the record's TTFT median over its requests (``ttfts_ms``)."""
    return _bootstrap(statistics.median, [r.get("ttfts_ms") or []], seed=0)


def ratio_ci(r: dict, base: dict) -> tuple[float, float] | None:
    """95 % interval of ``r``'s TTFT median over the baseline record ``base``'s (both
    resampled): the spread from the requests each run drew."""

    def ratio(x: list[float], y: list[float]) -> float:
        return statistics.median(x) / statistics.median(y)

    return _bootstrap(ratio, [r.get("ttfts_ms") or [], base.get("ttfts_ms") or []], seed=1)


def _dtypes(r: dict) -> str:
    d = r.get("kv_cache_dtype") or {}
    p, q = d.get("prefill", "bf16"), d.get("decode", "bf16")
    return p if p == q else f"{p}->{q}"


def capacity_rows(recs: list[dict]) -> list[str]:
    """Per config: KV dtypes and SGLang's max_total_num_tokens of prefill and decode, the
    decode's against stock mooncake's (bf16) decode."""
    seen: dict[str, dict] = {}
    for r in sorted(recs, key=_order):
        if r.get("max_total_tokens") and config_name(r) not in seen:
            seen[config_name(r)] = r
    if not seen:
        return []
    ref = next(
        (r["max_total_tokens"].get("decode") for r in seen.values() if kind(r) == "mooncake"), None
    )
    lines = [
        "| config | KV dtype | prefill max_total_tokens | decode max_total_tokens "
        "| decode vs mooncake (bf16) |",
        "|---|---|---|---|---|",
    ]
    for name, r in seen.items():
        m = r["max_total_tokens"]
        rel = f"{m['decode'] / ref:.2f}x" if ref and m.get("decode") else "-"
        lines.append(
            f"| {name} | {_dtypes(r)} | {_f(m.get('prefill'))} | {_f(m.get('decode'))} | {rel} |"
        )
    return lines


def _point_table(have: list[dict], head: list[str], cells) -> list[str]:
    """A table of one row per record (config, input, concurrency, ``cells(r)``, TTFT p50)."""
    lines = [
        "| config | input | conc | " + " | ".join(head) + " | TTFT p50 |",
        "|---|---|---|" + "---|" * (len(head) + 1),
    ]
    for r in sorted(have, key=lambda r: (_point(r), _order(r))):
        lines.append(
            f"| {label(r)} | {r['input_len']} | {r['concurrency']} | "
            + " | ".join(_f(v, ".1f") for v in cells(r))
            + f" | {_f(r['ttft_p50_ms'])} |"
        )
    return lines


def timeline_rows(recs: list[dict]) -> list[str]:
    """Per spectrum record with a timeline (since 2026-12-05): the median request's events
    in ms after the decode created its receiver, beside the point's TTFT p50."""
    have = [r for r in recs if r.get("timeline_ms")]
    if not have:
        return []
    events = list(dict.fromkeys(e for r in have for e in r["timeline_ms"]))  # records' order
    return _point_table(have, events, lambda r: [r["timeline_ms"].get(e) for e in events])


def _sans_budget(r: dict) -> str:
    """The config name without its budget (``spectrum:auto+lg8@tcp`` -> ``spectrum:+lg8@tcp``):
    the deployments that differ from an ``auto`` one only in the budget share it."""
    name = config_name(r)
    head, _, rest = name.partition(":")
    cut = min((i for i, c in enumerate(rest) if c in ":+@"), default=len(rest))
    return f"{head}:{rest[cut:]}"


def auto_rows(recs: list[dict]) -> list[str]:
    """Per ``spectrum:auto`` record: its TTFT p50 over that of each fixed budget of the
    same deployment otherwise (same options, link, point), with the 95 % interval, the
    best first (issue 17: within 10 % of the best fixed budget)."""
    autos = [r for r in recs if r.get("budget_mode") == "auto" and r.get("ttft_p50_ms")]
    lines = []
    for r in sorted(autos, key=lambda r: (_point(r), _order(r))):
        fixed = [
            f
            for f in recs
            if f.get("budget_mode") == "fixed"
            and f.get("ttft_p50_ms")
            and _point(f) == _point(r)
            and _sans_budget(f) == _sans_budget(r)
        ]
        if not fixed:
            continue
        cells = []
        for f in sorted(fixed, key=lambda f: f["ttft_p50_ms"]):
            ci = ratio_ci(r, f)
            x = r["ttft_p50_ms"] / f["ttft_p50_ms"]
            cells.append(
                f"b={f['budget']:g} {_f(f['ttft_p50_ms'])} ms: {x:.2f}x"
                + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
            )
        lines.append(
            f"| {label(r)} | {r['input_len']} | {r['concurrency']} | {_f(r['ttft_p50_ms'])} "
            f"| {_f(r.get('chosen_budget_mean'), '.2f')} | {'; '.join(cells)} |"
        )
    if not lines:
        return []
    head = [
        "| auto config | input | conc | TTFT p50 | chosen b | against each fixed budget "
        "(best first): its p50, auto's ratio (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    return head + lines


def stage_rows(recs: list[dict]) -> list[str]:
    """Per record with SGLang's own per-request stages (``sglang_stage_ms``, since
    2026-12-05; both backends): each role's median stage durations in ms."""
    have = [r for r in recs if r.get("sglang_stage_ms")]
    if not have:
        return []
    cols = list(
        dict.fromkeys(
            (role, k)
            for r in have
            for role, stages in r["sglang_stage_ms"].items()
            for k in stages
            if k != "requests"
        )
    )
    head = [f"{role} {k.removesuffix('_duration')}" for role, k in cols]
    return _point_table(
        have, head, lambda r: [r["sglang_stage_ms"].get(role, {}).get(k) for role, k in cols]
    )


def _correct_lines(correct: dict) -> list[str]:
    lines = ["## Correctness (SmolLM2-135M, real weights)", ""]
    if correct.get("error"):
        lines += [f"Failed: `{correct['error'][:500]}`", ""]
    if "identical" in correct:
        for name, info in (correct.get("pairs") or {}).items():
            same = correct["identical"].get(name)
            ident = (
                f"greedy outputs identical to {info['reference']}: {same}; "
                if info.get("reference")
                else ""
            )
            lines.append(
                f"- {name} ({info['config']}): {ident}passcode "
                f"{correct.get('secret', {}).get(name)}, "
                f"path {(correct.get('paths') or {}).get(name)}"
            )
        for name in ("single", "single-fp8"):
            if name in correct.get("secret", {}):
                lines.append(f"- {name}: passcode {correct['secret'][name]}")
    else:  # older format
        for k in ("b1_identical_to_single", "secret_single", "paths"):
            if k in correct:
                lines.append(f"- {k}: {correct[k]}")
        for b in correct.get("budgets", []):
            if f"secret_b{b:g}" in correct:
                lines.append(f"- secret_b{b:g}: {correct[f'secret_b{b:g}']}")
    return lines + [""]


def _tp_lines(tp: dict) -> list[str]:
    lines = [f"## Tensor parallelism (TP {tp.get('tp')}, {tp.get('model')})", ""]
    lines += [f"Hardware: {tp.get('hardware')}.", ""]
    if tp.get("error"):
        lines += [f"Failed: `{tp['error'][:500]}`", ""]
    for k in ("b1", "b0.5", "mooncake"):
        if f"{k}_identical_to_single" in tp:
            lines.append(f"- {k}_identical_to_single: {tp[f'{k}_identical_to_single']}")
    for name, ranks in (tp.get("per_rank") or {}).items():
        lines.append(f"- {name} per rank: {ranks}")
    return lines + [""]


def markdown(
    recs: list[dict], correct: dict | None, tp: dict | None = None, failed: dict | None = None
) -> str:
    lines = ["# SGLang PD serving on the GPU: spectrum against mooncake (bf16 and FP8 KV)", ""]
    if recs:
        lines += [f"Hardware: {recs[0]['hardware']}.", ""]
        lines += [
            "TTFT p50 of each config and its ratio to stock `mooncake` and to `mooncake-fp8` "
            "(`--kv-cache-dtype fp8_e4m3` on both servers) at the same TP, link, prompt length "
            "and concurrency. `chosen b`: mean budget the prefill chose per request "
            "(`spectrum:auto`). Where a record lists its requests' TTFTs (bench_serving "
            "`--output-details`, since 2026-12-05), the p50 and each ratio carry a 95 % "
            "percentile-bootstrap interval over the requests (both records resampled): the "
            "spread from which requests a run drew; runs can differ by more (which requests "
            "share a prefill batch differs between runs).",
            "",
            "| config | KV dtype | input | conc | TTFT p50 | p50 95% CI | mean | p99 ms "
            "| / mooncake | / mooncake-fp8 | req/s | MiB/req | chosen b | parts | pack "
            "| transfer | unpack ms | link Gb/s | path |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = baselines(recs)
        last = None
        for r in sorted(recs, key=lambda r: (_point(r), _order(r))):
            if _point(r) != last and last is not None:
                lines.append("| | | | | | | | | | | | | | | | | | | |")
            last = _point(r)
            rel = " | ".join(ratio_cells(r, base))
            ci = p50_ci(r)
            lines.append(
                f"| {label(r)} | {_dtypes(r)} | {r['input_len']} | {r['concurrency']} "
                f"| {_f(r['ttft_p50_ms'])} | {f'{ci[0]:.0f}-{ci[1]:.0f}' if ci else '-'} "
                f"| {_f(r['ttft_mean_ms'])} | {_f(r['ttft_p99_ms'])} "
                f"| {rel} | {_f(r['req_per_s'], '.2f')} | {_f(r['bytes_per_req'] / 2**20, '.0f')} "
                f"| {_f(r.get('chosen_budget_mean'), '.2f')} | {_f(r.get('parts'), 'g')} "
                f"| {_f(r['pack_ms'], '.1f')} | {_f(r['transfer_ms'], '.1f')} "
                f"| {_f(r['unpack_ms'], '.1f')} | {_f(r['link_gbps'], '.1f')} "
                f"| {','.join(r.get('paths') or []) or '-'} |"
            )
        lines.append("")
        for title, text, rows in (
            (
                "KV capacity (SGLang's max_total_num_tokens)",
                "Each 8B server's KV pool gets the same bytes (the 16-bit tokens of "
                "`--big-max-tokens`; an FP8 pool holds twice the tokens in them).",
                capacity_rows(recs),
            ),
            (
                "`auto` against the fixed budgets of the same deployment",
                "Each `spectrum:auto` record beside the records that differ from it only in "
                "the budget (same options, link, prompt length and concurrency), best first.",
                auto_rows(recs),
            ),
            (
                "Request timeline (median ms after the decode created the receiver)",
                "Each event's median over the point's requests, from the two servers' stats "
                "lines on one host's clock: the decode's grant out, the prefill's sender "
                "created, every grant there (`prefill_ready`), its first part handed to the "
                "transfer workers, `Sent` out, `Sent` in at the decode, the KV in the pool, "
                "SGLang's poll seeing it. What follows until the TTFT is the decode's "
                "scheduling and first forward, and the router.",
                timeline_rows(recs),
            ),
            (
                "SGLang's request stages (median ms, both backends)",
                "From each server's `ReqTimeStats` lines (`--enable-request-time-stats-logging`"
                ", logged when a request finishes on that server): prefill bootstrap, queue "
                "(waiting for a batch), forward (until its KV is sent); decode bootstrap, alloc"
                " wait, transfer (waiting for the KV), queue (waiting for a decode batch), "
                "forward (its decode steps).",
                stage_rows(recs),
            ),
        ):
            if rows:
                lines += [f"## {title}", "", text, ""] + rows + [""]
    if failed:
        lines += ["## Failed (skipped by later calls; `--retry-failed`)", ""]
        lines += [f"- {k}: `{v[:300]}`" for k, v in sorted(failed.items())] + [""]
    if correct:
        lines += _correct_lines(correct)
    if tp:
        lines += _tp_lines(tp)
    return "\n".join(lines)


def summary(recs: list[dict], correct: dict | None) -> str:
    out = ["", "=== serving_gpu summary ==="]
    if correct:
        out.append(
            "correct: identical "
            f"{correct.get('identical', correct.get('b1_identical_to_single'))}, "
            f"passcode {correct.get('secret')}, paths {correct.get('paths')}"
            + (f", ERROR {correct['error'][:200]}" if correct.get("error") else "")
        )
    out.append(
        f"{'config':34} {'L':>6} {'C':>2} {'p50':>7} {'p99':>7} {'/moon':>6} {'/fp8':>6} {'MiB':>6}"
    )
    base = baselines(recs)
    for r in sorted(recs, key=lambda r: (_point(r), _order(r))):
        rel = [f"{x:.2f}" if x else "-" for x in ratios(r, base)]
        out.append(
            f"{label(r):34} {r['input_len']:>6} {r['concurrency']:>2} {_f(r['ttft_p50_ms']):>7} "
            f"{_f(r['ttft_p99_ms']):>7} {rel[0]:>6} {rel[1]:>6} {r['bytes_per_req'] / 2**20:>6.0f}"
        )
    return "\n".join(out)


def plot(recs: list[dict], path: Path) -> None:
    """TTFT p50 per config, one panel per (prompt length, concurrency), bars labelled with
    the ratio to stock mooncake on the same link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in recs if r.get("ttft_p50_ms")]
    panels = sorted({(r["input_len"], r["concurrency"]) for r in recs})
    first = {label(r): r for r in reversed(recs)}
    names = sorted(first, key=lambda n: (_point(first[n])[:3], _order(first[n])))
    ncol = 2 if len(panels) > 1 else 1
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(6.5 * ncol, 0.3 * len(names) * nrow + 1.5 * nrow), squeeze=False
    )
    base = baselines(recs)
    for ax, (L, C) in zip(axes.flat, panels):
        rows = {label(r): r for r in recs if (r["input_len"], r["concurrency"]) == (L, C)}
        ys = [n for n in names if n in rows]
        vals = [rows[n]["ttft_p50_ms"] for n in ys]
        colors = ["tab:gray" if kind(rows[n]) in BASELINES else "tab:blue" for n in ys]
        ax.barh(range(len(ys)), vals, color=colors)
        for i, n in enumerate(ys):
            rel = ratios(rows[n], base)[0]
            ax.text(vals[i], i, f" {rel:.2f}x" if rel else "", va="center", fontsize=7)
        ax.set_yticks(range(len(ys)), ys, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("TTFT p50 (ms)")
        ax.set_title(f"{L} tokens, concurrency {C}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"PD TTFT p50 (x: against stock mooncake, same link); {recs[0]['hardware'].split(';')[0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _key(r: dict) -> tuple:
    return (config_name(r), r["input_len"], r["concurrency"], r.get("tp", 1))


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
    recs = sorted(merged.values(), key=lambda r: (_point(r), _order(r)))
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
