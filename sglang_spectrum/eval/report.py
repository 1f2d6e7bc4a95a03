"""Result files of the evaluation: merged JSON records, markdown tables, plots."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

KEY_FIELDS = ("model", "method", "allocator", "budget", "metric", "context")


def record_key(r: dict) -> tuple:
    """What identifies a record: a later one with the same key replaces it."""
    return tuple(r.get(k) for k in KEY_FIELDS)


def merge_records(path: str | os.PathLike[str], new: list[dict]) -> list[dict]:
    """Add ``new`` to the JSON list at ``path`` (replacing records with the same key)."""
    p = Path(path)
    old = json.loads(p.read_text()) if p.is_file() else []
    index = {record_key(r): r for r in old}
    for r in new:
        index[record_key(r)] = r
    records = sorted(index.values(), key=lambda r: tuple(str(r.get(k)) for k in KEY_FIELDS))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, p)
    return records


def _fmt(r: dict) -> str:
    v, se = r["value"], r.get("stderr")
    if r["metric"] in ("niah_acc", "niah_retention"):
        return f"{100 * v:.0f}%"
    if r["metric"] == "ppl_delta_pct":
        return f"{v:+.2f}% ±{se:.2f}" if se == se and se is not None else f"{v:+.2f}%"
    return f"{v:.3f}"


HEADLINE_METHODS = (
    ("spectrum-auto+kc", "paper"),
    ("spectrum-auto", "paper"),
    ("spectrum-auto+had+g32", "paper"),
    ("spectrum-3tier+kc", "paper"),
    ("spectrum-3tier", "paper"),
    ("spectrum-3tier+had+g32", "paper"),
    ("spectrum-3tier+had+g32+kc", "paper"),
    ("pdtrim", "-"),
    ("snapkv", "-"),
    ("int4+kc", "-"),
    ("int4", "-"),
    ("int4+had+g32", "-"),
)


def longest_retrieving_context(
    records: list[dict], model: str, floor: float = 0.95, among: set[int] | None = None
) -> int | None:
    """The longest NIAH context (of ``among``, if given) where full precision
    retrieves >= ``floor``."""
    ok = [
        r["context"]
        for r in records
        if r["model"] == model and r["metric"] == "niah_acc" and r["method"] == "full"
        and r["value"] >= floor and (among is None or r["context"] in among)
    ]  # fmt: skip
    return max(ok, default=None)


def niah_context(records: list[dict], model: str) -> int | None:
    """The longest NIAH context with method runs where full precision retrieves >= 95 %
    (else the longest with method runs): where retention says most."""
    runs = {r["context"] for r in records if r["model"] == model and r["metric"] == "niah_acc"
            and r["method"] != "full"}  # fmt: skip
    return longest_retrieving_context(records, model, among=runs) or max(runs, default=None)


def headline_table(records: list[dict], budgets: tuple[float, ...] = (0.3, 0.5)) -> list[str]:
    """Per model: perplexity change and NIAH retention at ``budgets`` for SpectrumKV and
    the baselines (the issue's headline)."""
    index = {record_key(r): r for r in records}
    out = []
    for model in sorted({r["model"] for r in records}):
        ctx = niah_context(records, model)
        ppl_ctx = next((r["context"] for r in records if r["model"] == model
                        and r["metric"] == "ppl_delta_pct"), None)  # fmt: skip
        cols = [f"ppl Δ b={b:g}" for b in budgets] + [f"NIAH ret. b={b:g}" for b in budgets]
        out += [f"### {model} (ppl: C={ppl_ctx}; NIAH: {ctx} tokens)", ""]
        out += ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for method, alloc in HEADLINE_METHODS:
            cells = []
            for metric, c in (("ppl_delta_pct", ppl_ctx), ("niah_retention", ctx)):
                for b in budgets:
                    r = index.get((model, method, alloc, b, metric, c))
                    cells.append(_fmt(r) if r else "")
            if any(cells):
                out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def markdown_tables(records: list[dict]) -> str:
    """The headline, then one table per (model, metric, context): rows method/allocator,
    columns budgets."""
    groups = defaultdict(list)
    for r in records:
        if r["metric"].startswith("probe"):
            continue
        groups[(r["model"], r["metric"], r["context"])].append(r)
    out = []
    probes = [r for r in records if r["metric"].startswith("probe")]
    if probes:
        out += [
            "## INT4 probe decisions (3-tier NIAH trials at b=0.3)",
            "",
            "| model | codec | decision | trials passed | context |",
            "|---|---|---|---|---|",
        ]
        for r in probes:
            out.append(
                f"| {r['model']} | {r['method'].removeprefix('probe') or 'plain'}"
                f" | tiers {r.get('decision')} | {r.get('passed_trials')}/{r['n']}"
                f" | {r['context']} |"
            )
        out.append("")
    if any(r["metric"] in ("ppl_delta_pct", "niah_retention") for r in records):
        out += ["## Headline: SpectrumKV vs PDTrim, SnapKV and uniform INT4", ""]
        out += headline_table(records)
    for (model, metric, context), rows in sorted(groups.items(), key=lambda x: str(x[0])):
        budgets = sorted({r["budget"] for r in rows if r["method"] != "full"})
        out += [f"## {model}: {metric} (context {context})", ""]
        out.append("| method | allocator | " + " | ".join(f"b={b:g}" for b in budgets) + " |")
        out.append("|---|---|" + "---|" * len(budgets))
        by_row = defaultdict(dict)
        for r in rows:
            by_row[(r["method"], r["allocator"])][r["budget"]] = r
        for (method, alloc), cells in sorted(by_row.items()):
            if method == "full":
                r = next(iter(cells.values()))
                out.append(f"| full | - | {_fmt(r)} (b=1) |" + " |" * (len(budgets) - 1))
                continue
            vals = [
                f"{_fmt(cells[b])} ({cells[b]['bytes_ratio']:.3f})" if b in cells else ""
                for b in budgets
            ]
            out.append(f"| {method} | {alloc} | " + " | ".join(vals) + " |")
        out.append("")
    out.append("Cells: value (measured bytes ratio = packed bytes / full 16-bit bytes).")
    return "\n".join(out) + "\n"


def plot_records(records: list[dict], out_dir: str | os.PathLike[str]) -> list[Path]:
    """PNG per model: perplexity change vs budget and NIAH accuracy vs budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    models = sorted({r["model"] for r in records})
    for model in models:
        mine = [r for r in records if r["model"] == model]
        panels = [("ppl_delta_pct", "perplexity change vs full (%)", None)]
        niah_ctx = {
            r["context"] for r in mine if r["metric"] == "niah_acc" and r["method"] != "full"
        }
        panels += [("niah_acc", "NIAH accuracy", c) for c in sorted(niah_ctx, reverse=True)]
        present = [p for p in panels if any(r["metric"] == p[0] for r in mine)]
        if not present:
            continue
        names = sorted({(r["method"], r["allocator"]) for r in mine if r["method"] != "full"})
        cmap = plt.get_cmap("tab20")
        colors = {name: cmap(i % 20) for i, name in enumerate(names)}  # same colour every panel
        handles = {}
        fig, axes = plt.subplots(
            1, len(present), figsize=(6 * len(present) + 2.5, 4.5), squeeze=False
        )
        for ax, (metric, label, ctx) in zip(axes[0], present):
            rows = [r for r in mine if r["metric"] == metric]
            ctx = ctx if ctx is not None else max(r["context"] for r in rows)
            series = defaultdict(list)
            for r in rows:
                if r["context"] == ctx and r["method"] != "full":
                    series[(r["method"], r["allocator"])].append((r["bytes_ratio"], r["value"]))
            for (method, alloc), pts in sorted(series.items()):
                pts.sort()
                name = method if alloc == "-" else f"{method} ({alloc})"
                style = "-o" if method.startswith("spectrum") else "--s"
                (line,) = ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], style, ms=4,
                    color=colors[(method, alloc)],
                )  # fmt: skip
                handles[name] = line
            full = [r for r in rows if r["method"] == "full" and r["context"] == ctx]
            if full and metric == "niah_acc":
                handles["full precision"] = ax.axhline(full[0]["value"], color="k", lw=0.8, ls=":")
            if metric == "ppl_delta_pct":
                ax.set_yscale("symlog", linthresh=1.0)
                ax.axhline(0, color="k", lw=0.8, ls=":")
            ax.set_xlabel("bytes sent / full 16-bit KV bytes")
            ax.set_ylabel(label)
            ax.set_title(f"{model} (context {ctx})")
            ax.grid(alpha=0.3)
        fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
        fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
        path = out / f"quality_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
