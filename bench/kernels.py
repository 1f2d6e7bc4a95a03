"""Benchmark of the fused pack/unpack kernels on one GPU (run on the H200).

Llama-3-8B KV shape (32 layers, 8 KV heads, head_dim 128, bf16) in paged pools
(page 64, shuffled pages), 1k/4k/16k tokens, budgets 0.3 and 0.5 with tier maps
from the real allocator (``codec.plan_tiers``: key-norm scores, paper waterfall)
on synthetic KV with per-channel scales, outlier channels and per-token norm
spread. In the same run it measures:

- ``copy`` / ``copy_triton``: ``dst.copy_(src)`` and a plain Triton copy of the
  request's full 16-bit KV bytes (the faster is the bandwidth ceiling);
- ``sglang_gather`` / ``sglang_scatter``: SGLang's own fused staging kernels
  (``sglang/srt/disaggregation/common/staging_buffer.py``), all layers in one
  launch, the copy-only anchor;
- ``pack`` / ``unpack``: our kernels given a plan (payload allocation and gap
  zeroing included), CUDA-graph replays like ``copy`` and SGLang's kernels
  (device time); ``*_eager``: the same Python call, launch overhead included;
  ``pack_e2e`` / ``unpack_e2e``: the whole API call (plan, checksum, header;
  unpack also validates with the reference ``read_header``);
- ``checksum_torch`` / ``checksum_triton``; ``score_torch`` (reference
  ``key_norm_scores`` on gathered keys, gather included) / ``score_triton``.

Timing: CUDA events around each call, 5 warm-ups, median of ``--iters`` (>= 20).
``gbps`` counts bytes read + written; ``ratio_to_copy`` = gbps / copy gbps at the
same token count; ``ratio_to_sglang`` = ms / SGLang gather ms (pack side) or
scatter ms (unpack side). Usage: ``python bench/kernels.py --out bench/results``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

from sglang_spectrum import kernels as K
from sglang_spectrum.codec import decode_kv, pack_tiers, payload_checksum, plan_tiers
from sglang_spectrum.config import SpectrumConfig
from sglang_spectrum.scoring import key_norm_scores

LAYERS, HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1) is a dry run of the script
LINKS_GBIT = (25, 100, 400)


def load_staging():
    """SGLang's staging module: the installed package, else a carried copy of the file."""
    try:
        from sglang.srt.disaggregation.common import staging_buffer

        return staging_buffer
    except Exception:  # noqa: BLE001 - sglang is not installed on the GPU machine
        path = pathlib.Path(__file__).resolve().parents[1] / ".carry" / "staging_buffer.py"
        return load_file("sglang_staging_buffer", path)


def load_file(name: str, path: pathlib.Path):
    """The module of a Python file, by path (the scripts run with PYTHONSAFEPATH:
    bench/ is not on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the CUDA-event timer of bench/request_path.py
event_ms = load_file(
    "request_path_bench", pathlib.Path(__file__).resolve().with_name("request_path.py")
).event_ms


def as_graph(fn):
    """``fn`` captured in a CUDA graph (its replay), or ``fn`` itself if capture fails."""
    if DEVICE != "cuda":
        return fn
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as exc:  # noqa: BLE001 - report and time eagerly instead
        print(f"graph capture failed ({exc!r}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return fn


def timeit(fn, iters: int, warmup: int = 5, graph: bool = False) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs (CUDA events).

    ``graph=True`` times CUDA-graph replays: device time without the Python
    launch overhead (what a captured decode/prefill step would see).
    """
    for _ in range(warmup if DEVICE == "cuda" else 1):
        fn()
    if graph:
        fn = as_graph(fn)
        fn()
    times = []
    for _ in range(iters):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        times.append(event_ms(fn))
    return statistics.median(times)


def make_pools(num_slots: int, gen: torch.Generator) -> tuple[list, list]:
    """Synthetic KV pools: log-normal channel scales, outlier channels, token norm spread."""
    ks, vs = [], []
    for _ in range(LAYERS):
        chan = torch.exp(0.7 * torch.randn(HEADS, HEAD_DIM, device=DEVICE, generator=gen))
        chan[:, :4] *= 8.0  # outlier channels (as in real keys)
        spread = 0.5 + torch.rand(num_slots, 1, 1, device=DEVICE, generator=gen)
        k = torch.randn(num_slots, HEADS, HEAD_DIM, device=DEVICE, generator=gen) * chan * spread
        v = torch.randn(num_slots, HEADS, HEAD_DIM, device=DEVICE, generator=gen)
        ks.append(k.to(DTYPE))
        vs.append(v.to(DTYPE))
    return ks, vs


class Recorder:
    """Collects result rows; ``ratio_to_copy`` is relative to the last copy measured."""

    def __init__(self, rows: list):
        self.rows, self.copy_gbps = rows, None

    def __call__(self, op, tokens, ms, read, written, budget=None, anchor=None, **more):
        gbps = (read + written) / ms / 1e6
        if op == "copy":
            self.copy_gbps = gbps
        elif op == "copy_triton":  # the ceiling is the faster of the two copies
            self.copy_gbps = max(self.copy_gbps, gbps)
        row = dict(
            op=op,
            tokens=tokens,
            budget=budget,
            ms=round(ms, 4),
            gbps=round(gbps, 1),
            ratio_to_copy=round(gbps / self.copy_gbps, 3),
            ratio_to_sglang=round(ms / anchor, 3) if anchor else None,
            bytes_read=read,
            bytes_written=written,
            **more,
        )
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + off, tl.load(src + off, mask=off < n), mask=off < n)


def bench_copy(rec: Recorder, tokens: int, full: int, iters: int, gen) -> None:
    """Two plain device copies of the request's bytes: ``copy_`` (cudaMemcpyAsync)
    and a 16-byte-vector Triton copy; the faster is the bandwidth ceiling."""
    src = torch.randint(0, 127, (full,), dtype=torch.uint8, device=DEVICE, generator=gen)
    dst = torch.empty_like(src)
    rec("copy", tokens, timeit(lambda: dst.copy_(src), iters, graph=True), full, full)
    s32, d32 = src.view(torch.int32), dst.view(torch.int32)
    grid = (triton.cdiv(s32.numel(), 4096),)
    ms = timeit(lambda: _copy_kernel[grid](s32, d32, s32.numel(), BLOCK=4096), iters, graph=True)
    rec("copy_triton", tokens, ms, full, full)


def bench_sglang(rec, staging, tokens, full, page, perm, slots, pk, pv, dk, dv, iters, extra):
    """SGLang's staging kernels, launched as ``_gather_all_layers_triton`` does."""
    elems = HEADS * HEAD_DIM
    per_layer = tokens * elems
    stage = torch.empty(full // 2, dtype=torch.int16, device=DEVICE)
    ptrs = torch.tensor([t.data_ptr() for t in pk + pv], dtype=torch.int64, device=DEVICE)
    dptrs = torch.tensor([t.data_ptr() for t in dk + dv], dtype=torch.int64, device=DEVICE)
    page_idx = perm.to(torch.int64)
    heads0 = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    grid = (2 * LAYERS, triton.cdiv(per_layer, 1024))

    def gather():
        staging._fused_gather_to_staging_kernel[grid](
            ptrs, page_idx, stage, tokens, elems, 0, per_layer, elems, page, 1024
        )

    def scatter():
        staging._fused_scatter_from_staging_kernel[grid](
            dptrs, page_idx, stage, heads0, tokens, elems, per_layer, elems, page, 2 * LAYERS, 1024
        )

    gather_ms = timeit(gather, iters, graph=True)
    rec("sglang_gather", tokens, gather_ms, full, full, anchor=gather_ms)
    scatter_ms = timeit(scatter, iters, graph=True)
    rec("sglang_scatter", tokens, scatter_ms, full, full, anchor=scatter_ms)
    staged = stage.view(2 * LAYERS, tokens, HEADS, HEAD_DIM)
    ok = all(torch.equal(staged[i].view(DTYPE), p[slots]) for i, p in enumerate(pk + pv))
    extra.setdefault("sglang_gather_checked", []).append(ok)
    return gather_ms, scatter_ms


def bench_budget(
    rec, tokens, budget, keys, values, slots, pk, pv, dk, dv, anchors, iters, extra, sweep: bool
) -> None:
    gather_ms, scatter_ms = anchors
    t0 = time.perf_counter()
    layout, tiers = plan_tiers(keys, values, SpectrumConfig(budget=budget))
    extra.setdefault("plan_tiers_s", {})[f"{tokens}/{budget}"] = round(time.perf_counter() - t0, 4)
    plan = K.plan_transfer(layout, tiers, slots)
    packed = K.pack_from_pools(pk, pv, slots, layout, tiers, plan=plan)
    ref = pack_tiers(keys, values, layout, tiers)
    kept, pay = plan.kept_nbytes(), plan.payload_nbytes
    common = dict(
        tier_counts=packed.tier_counts,
        nbytes=packed.nbytes,
        full_nbytes=layout.full_nbytes,
        identical_to_reference=torch.equal(ref.payload, packed.payload),
    )
    del ref
    pack_ms = timeit(lambda: K.pack_payload(pk, pv, plan), iters, graph=True)
    eager_ms = timeit(lambda: K.pack_payload(pk, pv, plan), iters)
    e2e_ms = timeit(lambda: K.pack_from_pools(pk, pv, slots, layout, tiers), iters)
    buf, payload = packed.to_tensor(), packed.payload
    for d in dk + dv:
        d.fill_(float("nan"))
    unpack_ms = timeit(lambda: K.unpack_payload(payload, dk, dv, plan), iters, graph=True)
    unpack_eager_ms = timeit(lambda: K.unpack_payload(payload, dk, dv, plan), iters)
    unpack_e2e_ms = timeit(lambda: K.unpack_to_pools(buf, dk, dv, slots), iters)
    dec_k, dec_v, keep = decode_kv(buf)
    keep = keep.to(DEVICE)
    common["unpack_identical_to_reference"] = all(
        torch.equal(d[slots[keep]].view(torch.int16), r[keep].view(torch.int16))
        for d, r in zip(dk + dv, dec_k + dec_v)
    )
    del dec_k, dec_v
    rec("pack", tokens, pack_ms, kept, pay, budget, gather_ms, **common)
    rec("pack_eager", tokens, eager_ms, kept, pay, budget, gather_ms, **common)
    rec("pack_e2e", tokens, e2e_ms, kept, pay, budget, gather_ms, **common)
    rec("unpack", tokens, unpack_ms, pay, kept, budget, scatter_ms, **common)
    rec("unpack_eager", tokens, unpack_eager_ms, pay, kept, budget, scatter_ms, **common)
    rec("unpack_e2e", tokens, unpack_e2e_ms, pay, kept, budget, scatter_ms, **common)
    rec("checksum_torch", tokens, timeit(lambda: payload_checksum(payload), iters), pay, 0, budget)
    rec("checksum_triton", tokens, timeit(lambda: K.fast_checksum(payload), iters), pay, 0, budget)
    if sweep:  # launch-shape sweep (default: 4096 elements, 4 warps per program)
        for be, nw in ((2048, 4), (8192, 4), (4096, 8), (8192, 8), (16384, 8)):
            alt = K.plan_transfer(layout, tiers, slots, block_elems=be, num_warps=nw)
            ms = timeit(lambda alt=alt: K.pack_payload(pk, pv, alt), iters, graph=True)
            rec(f"pack@{be}/w{nw}", tokens, ms, kept, pay, budget, gather_ms, **common)
            ms = timeit(lambda alt=alt: K.unpack_payload(payload, dk, dv, alt), iters, graph=True)
            rec(f"unpack@{be}/w{nw}", tokens, ms, pay, kept, budget, scatter_ms, **common)


def bench_tokens(
    tokens: int, budgets, page: int, iters: int, staging, rec: Recorder, extra: dict
) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    pages = tokens // page
    spare = pages // 4 + 1
    perm = torch.randperm(pages + spare, device=DEVICE, generator=gen)[:pages]
    slots = (perm[:, None] * page + torch.arange(page, device=DEVICE)).reshape(-1)
    pk, pv = make_pools((pages + spare) * page, gen)
    dk, dv = [torch.empty_like(x) for x in pk], [torch.empty_like(x) for x in pv]
    full = tokens * LAYERS * 2 * HEADS * HEAD_DIM * 2
    bench_copy(rec, tokens, full, iters, gen)
    anchors = bench_sglang(
        rec, staging, tokens, full, page, perm, slots, pk, pv, dk, dv, iters, extra
    )
    # Importance scoring (budget-independent): reference on gathered keys vs fused.
    first = [0] * LAYERS
    ms = timeit(lambda: key_norm_scores([k[slots] for k in pk]), iters)
    rec("score_torch", tokens, ms, full // 2, full // 2)
    ms = timeit(lambda: K.key_norm_scores_from_pools(pk, slots, first), iters)
    rec("score_triton", tokens, ms, full // 2, 0)
    keys, values = [k[slots] for k in pk], [v[slots] for v in pv]
    for budget in budgets:
        sweep = tokens == max(extra["tokens"])
        bench_budget(
            rec, tokens, budget, keys, values, slots, pk, pv, dk, dv, anchors, iters, extra, sweep
        )


def transfer_model(rows: list, min_tokens: int = 4096) -> list:
    """Time to move one request: pack + packed bytes / link + unpack vs full bytes / link."""
    out = []
    get = {(r["op"], r["tokens"], r["budget"]): r for r in rows}
    for (op, tokens, budget), r in sorted(get.items(), key=lambda kv: str(kv[0])):
        if op != "pack_e2e" or tokens < min_tokens:
            continue
        unpack = get[("unpack_e2e", tokens, budget)]
        kernels = get[("pack", tokens, budget)]["ms"] + get[("unpack", tokens, budget)]["ms"]
        score = get[("score_triton", tokens, None)]
        for gbit in LINKS_GBIT:
            rate = gbit * 1e9 / 8  # bytes per second
            wire = r["nbytes"] / rate * 1e3
            full = r["full_nbytes"] / rate * 1e3
            total = r["ms"] + wire + unpack["ms"]
            out.append(
                dict(
                    tokens=tokens,
                    budget=budget,
                    link_gbps=gbit,
                    full_ms=round(full, 3),
                    pack_ms=r["ms"],
                    wire_ms=round(wire, 3),
                    unpack_ms=unpack["ms"],
                    spectrum_ms=round(total, 3),
                    speedup=round(full / total, 2),
                    kernels_only_ms=round(kernels + wire, 3),
                    speedup_kernels_only=round(full / (kernels + wire), 2),
                    spectrum_with_scoring_ms=round(total + score["ms"], 3),
                    speedup_with_scoring=round(full / (total + score["ms"]), 2),
                    bytes_ratio=round(r["nbytes"] / r["full_nbytes"], 4),
                )
            )
    return out


def markdown(rows: list, model: list, meta: dict) -> tuple[str, str]:
    head = (
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}. "
        f"Llama-3-8B KV ({meta['shape'][0]} x 8 x 128, bf16), page {meta['page']}, "
        f"median of {meta['iters']} CUDA-event timings. gbps = (bytes read + written) / "
        "time; ratio_to_copy = gbps / the faster copy's gbps; ratio_to_sglang = ms / "
        "SGLang gather (pack side) or scatter (unpack side) ms.\n\n"
    )
    t = [
        "| op | tokens | budget | ms | GB/s | x copy BW | x SGLang time | tiers f/8/4/drop |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        tc = r.get("tier_counts")
        tiers = "/".join(str(tc[k]) for k in ("fp16", "int8", "int4", "drop")) if tc else ""
        t.append(
            f"| {r['op']} | {r['tokens']} | {r['budget'] if r['budget'] else ''} |"
            f" {r['ms']:.4f} | {r['gbps']:.0f} | {r['ratio_to_copy']:.2f} |"
            f" {r['ratio_to_sglang'] if r['ratio_to_sglang'] is not None else ''} |"
            f" {tiers} |"
        )
    kern = "# Kernel benchmark\n\n" + head + "\n".join(t) + "\n"
    m = [
        "| tokens | budget | link Gb/s | full ms | pack ms | wire ms | unpack ms |"
        " SpectrumKV ms | speedup | + scoring ms | speedup w/ scoring | kernels-only"
        " speedup | bytes ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in model:
        m.append(
            f"| {r['tokens']} | {r['budget']} | {r['link_gbps']} | {r['full_ms']} |"
            f" {r['pack_ms']} | {r['wire_ms']} | {r['unpack_ms']} | {r['spectrum_ms']} |"
            f" {r['speedup']} | {r['spectrum_with_scoring_ms']} |"
            f" {r['speedup_with_scoring']} | {r['speedup_kernels_only']} |"
            f" {r['bytes_ratio']} |"
        )
    assumptions = (
        "Assumptions: one request, the link fully used by it at its nominal rate "
        "(no protocol overhead, no RDMA per-page cost), no overlap of pack, wire and unpack "
        "(a per-layer pipeline would hide most of pack/unpack), pack = `pack_from_pools` "
        "end to end (plan, kernel, Triton checksum, header), unpack = `unpack_to_pools` end "
        "to end (reference `read_header` with its torch checksum, plan, kernel); the full-"
        "precision path is bytes / link only (no staging). 'with scoring' adds the fused "
        "key-norm scoring; 'kernels-only' uses the graph-replayed pack and unpack kernels "
        "(plan, checksum and validation excluded). The CPU allocator (`plan_tiers`) time "
        "is in kernels.json (`plan_tiers_s`).\n\n"
    )
    model_md = "# Transfer model\n\n" + head + assumptions + "\n".join(m) + "\n"
    return kern, model_md


def write_results(out: pathlib.Path, rows: list, meta: dict, min_tokens: int):
    """Write kernels.json/.md and transfer_model.json/.md (after every token count)."""
    model = transfer_model(rows, min_tokens)
    (out / "kernels.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    (out / "transfer_model.json").write_text(json.dumps(dict(meta=meta, model=model), indent=1))
    kern, model_md = markdown(rows, model, meta)
    (out / "kernels.md").write_text(kern)
    (out / "transfer_model.md").write_text(model_md)
    return kern, model_md


def main(argv=None) -> None:
    global DEVICE, LAYERS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=LAYERS)
    args = ap.parse_args(argv)
    DEVICE, LAYERS = args.device, args.layers
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA device")
    staging = load_staging()
    rows: list = []
    rec = Recorder(rows)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    meta = dict(
        device=name,
        torch=torch.__version__,
        triton=triton.__version__,
        iters=args.iters,
        page=args.page,
        tokens=args.tokens,
        shape=[LAYERS, HEADS, HEAD_DIM, str(DTYPE)],
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for tokens in args.tokens:
        bench_tokens(tokens, args.budgets, args.page, args.iters, staging, rec, meta)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        kern, model_md = write_results(out, rows, meta, min(4096, max(args.tokens)))
    print(kern)
    print(model_md)
    print("meta:", json.dumps(meta))
    if not math.isfinite(sum(r["ms"] for r in rows)):
        sys.exit("non-finite timing")


if __name__ == "__main__":
    main()
