"""Result files of the evaluation: merged JSON records, markdown tables, plots."""

from __future__ import annotations

import json
import math
import os
import re
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
    # the serving default: channel keys, key-norm scores
    ("spectrum-auto+kc+kn", "paper"),
    ("spectrum-auto+kc", "paper"),
    ("fp8_e4m3", "-"),  # SGLang's FP8 KV cache: b=0.5 only
    ("spectrum-auto+kc+kn+fp8", "paper"),  # the serving default over an FP8 e4m3 pool
    ("fp8_e5m2", "-"),
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
_KN_LAYERS = re.compile(r"^(?P<base>.+\+kn)(?P<g>\d+)$")  # +knG: first G layers score


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


def _contexts(records: list[dict], model: str, metric: str, non_full: bool = False) -> list[int]:
    return sorted(
        {r["context"] for r in records if r["model"] == model and r["metric"] == metric
         and not (non_full and r["method"] == "full")},
        reverse=True,
    )  # fmt: skip


def _full(records: list[dict], model: str, metric: str, context: int | None) -> dict | None:
    return next((r for r in records if r["model"] == model and r["metric"] == metric
                 and r["method"] == "full" and r["context"] == context), None)  # fmt: skip


def headline_blocks(records: list[dict], model: str) -> list[tuple[int | None, int | None]]:
    """The (ppl context, NIAH context) pairs of a model's headline tables: the longest
    of each first (the latest grid), then every shorter ppl context with the NIAH
    context where full precision retrieves best (:func:`niah_context`)."""
    ppl = _contexts(records, model, "ppl_delta_pct")
    niah = _contexts(records, model, "niah_acc", non_full=True)
    blocks = [(ppl[0] if ppl else None, niah[0] if niah else None)]
    blocks += [(c, niah_context(records, model)) for c in ppl[1:]]
    return blocks


def headline_table(records: list[dict], budgets: tuple[float, ...] = (0.3, 0.5)) -> list[str]:
    """Per model: perplexity change and NIAH retention at ``budgets`` for SpectrumKV and
    the baselines (the issue's headline), one table per (ppl context, NIAH context)."""
    index = {record_key(r): r for r in records}
    out = []
    for model in sorted({r["model"] for r in records}):
        for i, (ppl_ctx, ctx) in enumerate(headline_blocks(records, model)):
            full_ppl = _full(records, model, "ppl", ppl_ctx)
            full_niah = _full(records, model, "niah_acc", ctx)
            ppl_txt = f"ppl C={ppl_ctx}" + (f" ({full_ppl['n']} windows)" if full_ppl else "")
            niah_txt = f"NIAH {ctx} tokens" + (
                f" ({full_niah['n']} trials, full precision retrieves"
                f" {100 * full_niah['value']:.0f}%)" if full_niah else ""
            )  # fmt: skip
            ppl_txt, niah_txt = (t if c else "" for t, c in ((ppl_txt, ppl_ctx), (niah_txt, ctx)))
            what = "" if i == 0 else ", earlier grid"
            cols = [f"ppl Δ b={b:g}" for b in budgets] + [f"NIAH ret. b={b:g}" for b in budgets]
            out += [f"### {model}{what}: " + "; ".join(t for t in (ppl_txt, niah_txt) if t), ""]
            out += [
                "| method | " + " | ".join(cols) + " |",
                "|---|" + "---|" * len(cols),
            ]
            for method, alloc in HEADLINE_METHODS:
                cells = _cells(index, (model, method, alloc), "ppl_delta_pct", ppl_ctx, budgets)
                cells += _cells(index, (model, method, alloc), "niah_retention", ctx, budgets)
                if any(cells):
                    out.append(f"| {method} | " + " | ".join(cells) + " |")
            out.append("")
    return out


def _cells(index: dict, run: tuple, metric: str, context, budgets) -> list[str]:
    """One table cell per budget: ``run`` = (model, method, allocator)'s ``metric`` at
    ``context`` (:func:`_fmt`; empty where not measured)."""
    model, method, alloc = run
    found = (index.get((model, method, alloc, b, metric, context)) for b in budgets)
    return [_fmt(r) if r else "" for r in found]


def _paired_ppl_change(a: dict, ref: dict) -> tuple[float, float | None]:
    """Perplexity of ``a`` relative to ``ref`` (same windows), in %, with the stderr of
    the paired per-window NLL differences when both records carry them."""
    change = 100.0 * (a["value"] / ref["value"] - 1.0)
    wa, wr = a.get("window_nll"), ref.get("window_nll")
    if not wa or not wr or len(wa) != len(wr) or len(wa) < 2:
        return change, None
    d = [x - y for x, y in zip(wa, wr)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return change, 100.0 * sd / math.sqrt(len(d)) * a["value"] / ref["value"]


FIRST_GROUP_MAX_PPL_PCT = 0.1  # issue 17: at most +0.1 % ppl against whole-prompt scoring


def first_group_table(records: list[dict], budgets: tuple[float, ...] = (0.3, 0.5)) -> list[str]:
    """``X+knG`` (tier map from the key norms of layers 0..G-1) against ``X+kn`` (every
    layer): perplexity change, NIAH trials, whether G meets the target, per model."""
    index = {record_key(r): r for r in records}
    groups = defaultdict(set)  # (model, base method) -> {G}
    for r in records:
        m = _KN_LAYERS.match(r["method"])
        if m and r["metric"] in ("ppl", "niah_acc"):
            groups[(r["model"], m["base"])].add(int(m["g"]))
    out = []
    for (model, base), gs in sorted(groups.items()):
        alloc = next(r["allocator"] for r in records if r["model"] == model
                     and r["method"] == base)  # fmt: skip

        def longest(metric: str, model=model, base=base) -> int | None:
            ctxs = [r["context"] for r in records if r["model"] == model
                    and r["metric"] == metric and r["method"] == base]  # fmt: skip
            return max(ctxs, default=None)

        ppl_ctx, niah_ctx = longest("ppl"), longest("niah_acc")
        ref_ppl = {b: index.get((model, base, alloc, b, "ppl", ppl_ctx)) for b in budgets}
        ref_niah = {b: index.get((model, base, alloc, b, "niah_acc", niah_ctx)) for b in budgets}
        n_w = next((r["n"] for r in ref_ppl.values() if r), "?")
        n_t = next((r["n"] for r in ref_niah.values() if r), "?")
        full_niah = _full(records, model, "niah_acc", niah_ctx)
        if full_niah and full_niah.get("n") != n_t:  # another run's trials: not comparable
            full_niah = None
        full_txt = f", full precision {100 * full_niah['value']:.0f}%" if full_niah else ""
        what = [f"ppl C={ppl_ctx}, {n_w} windows"] if ppl_ctx else []
        what += [f"NIAH {niah_ctx} tokens, {n_t} trials{full_txt}"] if niah_ctx else []
        out += [f"### {model}: `{base}G` vs `{base}` ({'; '.join(what)})", ""]
        cols = [f"ppl Δ b={b:g}" for b in budgets] + [f"vs +kn b={b:g}" for b in budgets]
        cols += [f"NIAH b={b:g}" for b in budgets] + ["meets target"]
        out += ["| G | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        cells = _cells(index, (model, base, alloc), "ppl_delta_pct", ppl_ctx, budgets)
        cells += ["(reference)"] * len(budgets)
        cells += [_niah_cell(ref_niah[b], None) for b in budgets] + [""]
        out.append(f"| all (`{base}`) | " + " | ".join(cells) + " |")
        passing = []
        for g in sorted(gs):
            name = f"{base}{g}"
            cells = _cells(index, (model, name, alloc), "ppl_delta_pct", ppl_ctx, budgets)
            ok, why = True, []
            for b in budgets:
                r = index.get((model, name, alloc, b, "ppl", ppl_ctx))
                if r and ref_ppl[b]:
                    change, se = _paired_ppl_change(r, ref_ppl[b])
                    cells.append(f"{change:+.2f}%" + (f" ±{se:.2f}" if se is not None else ""))
                    if change > FIRST_GROUP_MAX_PPL_PCT:
                        ok = False
                        noise = se is not None and change - 2 * se <= FIRST_GROUP_MAX_PPL_PCT
                        why.append(f"ppl b={b:g}" + (" within 2 se" if noise else ""))
                else:
                    cells.append("")
                    ok = False
            for b in budgets:
                r = index.get((model, name, alloc, b, "niah_acc", niah_ctx))
                cells.append(_niah_cell(r, ref_niah[b]))
                if not r or not ref_niah[b]:
                    ok = False
                elif r["value"] < ref_niah[b]["value"]:
                    ok = False
                    why.append(f"NIAH b={b:g}")
            cells.append("yes" if ok else "no" + (f" ({', '.join(why)})" if why else ""))
            if ok:
                passing.append(g)
            out.append(f"| {g} | " + " | ".join(cells) + " |")
        out.append("")
        smallest = min(passing, default=None)
        larger_misses = [g for g in sorted(gs) if smallest and g > smallest and g not in passing]
        out.append(
            f"Smallest G meeting the target on {model}: "
            + (f"**{smallest}**" if smallest else f"none of {sorted(gs)}")
            + (f" (larger G missing it: {larger_misses})." if larger_misses else ".")
        )
        out.append("")
    return out


def _niah_cell(r: dict | None, ref: dict | None) -> str:
    """Accuracy (passes/trials); against ``ref``: the trials lost and gained."""
    if not r:
        return ""
    hits = r.get("hits")
    cell = f"{100 * r['value']:.0f}%" + (f" ({sum(hits)}/{len(hits)})" if hits else "")
    if ref and hits and ref.get("hits") and len(ref["hits"]) == len(hits):
        lost = sum(a and not b for a, b in zip(ref["hits"], hits))
        gained = sum(b and not a for a, b in zip(ref["hits"], hits))
        cell += " same trials" if not (lost or gained) else f" -{lost}/+{gained}"
    return cell


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
        out += [
            "## Headline: SpectrumKV vs the FP8 KV cache, PDTrim, SnapKV and uniform INT4",
            "",
        ]
        out += [
            "Cells: perplexity change vs full precision on the same windows (± stderr of"
            " the paired per-window difference) and NIAH retention (accuracy / full"
            " precision's on the same trials). `fp8_e4m3` / `fp8_e5m2`: SGLang's FP8 KV"
            " cache (`--kv-cache-dtype`, K and V cast with the checkpoint's per-layer"
            " scales, 1.0 here), 1 byte per element: b=0.5 exactly, no lower budget."
            " `+fp8`: SpectrumKV packing from such an FP8 e4m3 pool (b=0.5: the FP8"
            " cache's own bytes).",
            "",
        ]
        out += headline_table(records)
    if any(_KN_LAYERS.match(r["method"]) for r in records):
        out += ["## Tier map from the first layer group", ""]
        out += [
            "`+knG`: tokens scored by the key norms of layers 0..G-1 only (what a"
            " layer-pipelined prefill knows when its first layer group is done) instead"
            " of every layer (`+kn`, the whole-prompt tier map). `vs +kn`: perplexity"
            " against the whole-prompt tier map on the same windows (± stderr of the paired"
            " per-window difference). NIAH: accuracy (passes/trials); `-lost/+gained`"
            " trials against `+kn`. Target (issue 17): at most"
            f" +{FIRST_GROUP_MAX_PPL_PCT:g} % (point estimate) at both budgets and no lower"
            " NIAH accuracy; `within 2 se`: a miss smaller than twice its paired stderr,"
            " which these windows do not resolve. Gemma 3: G = 18 scores every layer over"
            " the keys of all positions, as SGLang's pool (no sliding-window pool) holds them,"
            " while `+kn`"
            " scores the eval's cache, whose sliding layers hold their last 511 positions.",
            "",
        ]
        out += first_group_table(records)
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


_FP8_MARKERS = {"fp8_e4m3": ("*", "black"), "fp8_e5m2": ("P", "dimgray")}


def plot_records(records: list[dict], out_dir: str | os.PathLike[str]) -> list[Path]:
    """PNG per model: perplexity change vs bytes sent (one panel per ppl context, top row)
    and NIAH accuracy vs bytes sent (one panel per context with method runs, bottom row).
    The FP8 baselines are single markers at their byte ratio 0.5; ``+knG`` variants are
    left out (their own table in the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    models = sorted({r["model"] for r in records})
    for model in models:
        mine = [r for r in records if r["model"] == model and not _KN_LAYERS.match(r["method"])]
        rows = []
        for metric in ("ppl_delta_pct", "niah_acc"):
            ctxs = _contexts(mine, model, metric, non_full=True)
            if ctxs:
                rows.append([(metric, c) for c in ctxs])
        if not rows:
            continue
        names = sorted({(r["method"], r["allocator"]) for r in mine if r["method"] != "full"})
        cmap = plt.get_cmap("tab20")
        colors = {name: cmap(i % 20) for i, name in enumerate(names)}  # same colour every panel
        colors.update({(m, "-"): c for m, (_, c) in _FP8_MARKERS.items()})
        handles = {}
        ncols = max(len(r) for r in rows)
        fig, axes = plt.subplots(
            len(rows), ncols, figsize=(6 * ncols + 2.5, 4.5 * len(rows)), squeeze=False
        )
        for ax_row, panels in zip(axes, rows):
            for ax in ax_row[len(panels) :]:
                ax.axis("off")
            for ax, (metric, ctx) in zip(ax_row, panels):
                at = [r for r in mine if r["metric"] == metric and r["context"] == ctx]
                series = defaultdict(list)
                for r in at:
                    if r["method"] != "full":
                        series[(r["method"], r["allocator"])].append((r["bytes_ratio"], r["value"]))
                for (method, alloc), pts in sorted(series.items()):
                    pts.sort()
                    name = method if alloc == "-" else f"{method} ({alloc})"
                    if method in _FP8_MARKERS:  # one point at b=0.5, its own marker
                        style, ms = _FP8_MARKERS[method][0], 12
                    else:
                        style, ms = ("-o" if method.startswith("spectrum") else "--s"), 4
                    (line,) = ax.plot(
                        [p[0] for p in pts], [p[1] for p in pts], style, ms=ms,
                        color=colors[(method, alloc)],
                    )  # fmt: skip
                    handles[name] = line
                full = [r for r in at if r["method"] == "full"]
                if full and metric == "niah_acc":
                    handles["full precision"] = ax.axhline(
                        full[0]["value"], color="k", lw=0.8, ls=":"
                    )
                if metric == "ppl_delta_pct":
                    ax.set_yscale("symlog", linthresh=1.0)
                    ax.axhline(0, color="k", lw=0.8, ls=":")
                ppl = metric == "ppl_delta_pct"
                label = "perplexity change vs full (%)" if ppl else "NIAH accuracy"
                n = next((r["n"] for r in full), None)
                unit = "windows" if ppl else "trials"
                ax.set_xlabel("bytes sent / full 16-bit KV bytes")
                ax.set_ylabel(label)
                ax.set_title(f"{model} (context {ctx}" + (f", {n} {unit})" if n else ")"))
                ax.grid(alpha=0.3)
        fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
        fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
        path = out / f"quality_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
