"""Request-path benchmark: ``transfer.pack_request`` / ``unpack_request`` end to end.

Llama-3-8B KV shape (32 layers x 8 KV heads x 128, bf16) in paged pools (page 64,
random page permutation, spare pages), synthetic KV with per-channel scales, outliers
and per-token norm spread. For tokens x budget x key_scales it times, with the very
functions the SGLang backend calls:

- ``pack_ms``: ``pack_request(k_pools, v_pools, slots, config, out=region)`` wall
  clock (it synchronises once at its end), median of ``--iters`` after warm-up;
- ``unpack_ms``: ``unpack_request(region, k_pools2, v_pools2, slots2,
  expected_checksum=...)`` into a second pool set, same timing;
- ``kernel_pack_ms`` / ``kernel_unpack_ms``: the Triton pack / unpack launches alone
  (``pack_payload`` / ``unpack_payload`` on the request's plan), CUDA events with the
  device kept busy while the host launches them (the kernels' own time);
  ``kernel_from_idle_ms``: [pack, unpack] from an idle device, the host's launch gaps
  included (before 2026-12-06 s18 the ``kernel_*_ms`` columns were these);
- ``copy_ms``: ``dst.copy_(src)`` of the request's full 16-bit KV bytes (bandwidth
  anchor: ``kernel_*_vs_copy`` = kernel bytes/s over copy bytes/s);
- ``pack_extra_bytes``: peak device memory ``pack_request`` allocates beyond what was
  allocated before (no temporary proportional to the full KV).

Pool pairs (``--pools``, ``prefill_dtype`` / ``decode_dtype`` in the records): ``bf16``
(bf16 -> bf16), ``fp8_e4m3`` / ``fp8_e5m2`` (SGLang FP8 KV on both sides: uint8 pools,
``fp8=FP8Pool``, scale 1.0 as SGLang without checkpoint scales; the same KV cast to
FP8), ``bf16-fp8_e4m3`` (the asymmetric deployment: bf16 prefill, FP8 decode).
``baseline_bytes`` is what the stock backend moves for that pair (the prefill's pool
bytes: the 16-bit KV, or half of it for FP8) and ``speedup_vs_pool`` the speedup over it.

Per link speed (25/100/400 Gb/s) one record: ``speedup = (full_bytes / link) /
(pack + packed_bytes / link + unpack)``, ``ideal = full_bytes / packed_bytes``.
Usage (H200)::

    python bench/request_path.py --out bench/results
    python bench/request_path.py --smoke --out /tmp/rp     # CPU, tiny shapes (torch path)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from sglang_spectrum.config import SpectrumConfig
from sglang_spectrum.fp8 import FP8Pool, quantize_fp8
from sglang_spectrum.transfer import pack_request, packed_size_bound, unpack_request

POOLS = {  # --pools name -> (prefill FP8 dtype or None: bf16, decode FP8 dtype or None)
    "bf16": (None, None),
    "fp8_e4m3": ("fp8_e4m3", "fp8_e4m3"),
    "fp8_e5m2": ("fp8_e5m2", "fp8_e5m2"),
    "bf16-fp8_e4m3": (None, "fp8_e4m3"),
}

LINKS_GBIT = (25, 100, 400)
TARGETS = {  # (link Gb/s, tokens) -> minimum speedup / ideal
    (100, 4096): 0.9,
    (100, 16384): 0.9,
    (400, 16384): 0.8,
    (400, 4096): 0.7,
}


def make_pools(layers, heads, head_dim, num_slots, dtype, device, gen):
    """K and V pools ``[num_slots, H, D]`` per layer: random KV with per-channel scales,
    per-token magnitudes and rare outliers (generated on the device)."""
    k_pools, v_pools = [], []
    for _ in range(layers):
        for pools, scale in ((k_pools, 2.0), (v_pools, 1.0)):
            chan = torch.exp(torch.randn(heads, head_dim, device=device, generator=gen))
            mag = torch.rand(num_slots, 1, 1, device=device, generator=gen) * 3 + 0.1
            x = torch.randn(num_slots, heads, head_dim, device=device, generator=gen)
            x = x * chan * mag * scale
            x = torch.where(torch.rand(x.shape, device=device, generator=gen) < 1e-3, x * 30.0, x)
            pools.append(x.to(dtype))
            del x
    return k_pools, v_pools


def paged_slots(tokens, page, num_pages, gen, device):
    """Slots of ``tokens`` positions in pages drawn at random from ``num_pages``."""
    pages = -(-tokens // page)
    perm = torch.randperm(num_pages, generator=gen)[:pages]
    return (perm[:, None] * page + torch.arange(page)).reshape(-1)[:tokens].to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn, iters, warmup, device) -> float:
    """Median wall clock (ms) of ``fn`` (which synchronises itself)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# GPU cycles (~1 ms on an H100/H200) of a spin kernel queued ahead of the start event, so
# the device is still busy while the host launches ``fn``: the events then time the
# kernels, not the host's launch latency before and between them (which
# ``pack_ms``/``unpack_ms`` and bench/part_cost.py measure).
QUEUE_LEAD_CYCLES = 2_000_000


def events(fn, iters, warmup, queued: bool = True) -> float:
    """Median device time (ms) of ``fn`` by CUDA events; ``queued``: behind a spin kernel
    (the kernels' own time), else from an idle device (plus the host's launch gaps)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(event_ms(fn, queued) for _ in range(iters))


def event_ms(fn, queued: bool = False) -> float:
    """Device time (ms) of one call of ``fn`` by CUDA events (``queued``: see
    :func:`events`)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if queued:
        torch.cuda._sleep(QUEUE_LEAD_CYCLES)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def kernel_times(kp, vp, kd, vd, slots, dst, region, res, iters, warmup, fp8_dst=None):
    """(pack ms, unpack ms, (pack ms, unpack ms) from an idle device) of the Triton launches
    alone on the request's plan (``kp, vp``: uint8 pools for an FP8 prefill; ``fp8_dst``:
    the decode's FP8 pools ``kd, vd``)."""
    from sglang_spectrum import kernels as K
    from sglang_spectrum.codec import header_tier_map, read_header

    header, payload = read_header(region[: res.nbytes], checksum=K.fast_checksum)
    tiers = header_tier_map(header).to(slots.device)
    counts = tuple(res.tier_counts[n] for n in ("fp16", "int8", "int4"))
    plan = K.plan_from_counts(header.layout, tiers, counts, slots)
    scratch = torch.empty(plan.payload_nbytes, dtype=torch.uint8, device=slots.device)

    def pack():
        K.pack_payload(kp, vp, plan, out=scratch)

    pack_ms = events(pack, iters, warmup)
    assert torch.equal(scratch, payload), "kernel payload differs from pack_request's"
    uplan = K.plan_from_counts(header.layout, tiers, counts, dst)

    def unpack():
        K.unpack_payload(payload, kd, vd, uplan, fp8=fp8_dst)

    unpack_ms = events(unpack, iters, warmup)
    idle = (events(pack, iters, 0, queued=False), events(unpack, iters, 0, queued=False))
    return pack_ms, unpack_ms, idle


def gpu_bench_parser(doc: str, tokens: list[int], budgets: list[float]) -> argparse.ArgumentParser:
    """The options the GPU request-path benches share (their own ones are added after)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tokens", type=int, nargs="+", default=tokens)
    ap.add_argument("--budgets", type=float, nargs="+", default=budgets)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    return ap


def run_gpu_bench(name: str, args, run, markdown) -> None:
    """``run(args)`` on a CUDA device, then :func:`write_results` of ``name``."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{name}: needs a CUDA device")
    result = run(args)
    write_results(args.out, name, result, markdown(result))


def write_results(out_dir: str, name: str, result, md: str) -> None:
    """``<out_dir>/<name>.json`` (``result``) and ``<name>.md`` (``md``); prints ``md``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(md)
    print(md)


def copy_ms(full_bytes, device, iters, warmup) -> float:
    src = torch.empty(full_bytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    return events(lambda: dst.copy_(src), iters, warmup)


def setup(args) -> tuple[torch.device, int, dict]:
    """Device, page count and pools of a run, room for the largest token count plus 8
    pages: per pool kind (``None``: bf16, or an FP8 dtype name) the source ``(kp, vp)``
    (random KV, cast to FP8 with scale 1.0 as SGLang stores it) and destination
    ``(kd, vd)`` (zeros) of each kind ``--pools`` needs."""
    device = torch.device(args.device)
    gen_dev = torch.Generator(device=device).manual_seed(0)
    num_pages = -(-max(args.tokens) // args.page) + 8
    kp, vp = make_pools(
        args.layers,
        args.heads,
        args.head_dim,
        num_pages * args.page,
        torch.bfloat16,
        device,
        gen_dev,
    )
    src, dst = {}, {}
    for name in args.pools:
        src_kind, dst_kind = POOLS[name]
        if src_kind not in src:
            fp8 = pool_format(src_kind, args.layers)
            src[src_kind] = (
                (kp, vp)
                if fp8 is None
                else (
                    [quantize_fp8(p, fp8.dtype) for p in kp],
                    [quantize_fp8(p, fp8.dtype) for p in vp],
                )
            )
        if dst_kind not in dst:
            dtype = torch.bfloat16 if dst_kind is None else torch.uint8
            dst[dst_kind] = tuple([torch.zeros_like(p, dtype=dtype) for p in kp] for _ in "kv")
    return device, num_pages, {"src": src, "dst": dst}


def pool_format(kind: str | None, layers: int) -> FP8Pool | None:
    """The ``fp8=`` argument of pools of ``kind`` (SGLang without checkpoint scales: 1.0)."""
    return None if kind is None else FP8Pool.of(kind, layers)


def case_pools(pool_sets: dict, pools: str, layers: int) -> tuple:
    """``(kp, vp, kd, vd, fp8_src, fp8_dst)`` of a ``--pools`` pair (``setup``'s pools)."""
    src_kind, dst_kind = POOLS[pools]
    kp, vp = pool_sets["src"][src_kind]
    kd, vd = pool_sets["dst"][dst_kind]
    return kp, vp, kd, vd, pool_format(src_kind, layers), pool_format(dst_kind, layers)


def cases(args, device, num_pages):
    """Each case ``(pools, tokens, budget, key_scales, slots, dst, config, region)``:
    source and destination slots drawn per token count (one host generator), a packing
    region of ``packed_size_bound`` bytes for the prefill's pool dtype (released before
    the next case's, once the caller drops it)."""
    gen = torch.Generator().manual_seed(0)
    for tokens in args.tokens:
        slots = paged_slots(tokens, args.page, num_pages, gen, device)
        dst = paged_slots(tokens, args.page, num_pages, gen, device)
        for pools in args.pools:
            dtype = POOLS[pools][0] or torch.bfloat16
            for budget in args.budgets:
                for keys in args.key_scales:
                    cfg = SpectrumConfig(budget=budget, key_scales=keys, allow_drop=False)
                    bound = packed_size_bound(
                        tokens, args.layers, args.heads, args.head_dim, dtype, cfg
                    )
                    region = torch.empty(bound, dtype=torch.uint8, device=device)
                    yield pools, tokens, budget, keys, slots, dst, cfg, region
                    del region


def run(args) -> tuple[list[dict], dict]:
    device, num_pages, pool_sets = setup(args)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {
        "hardware": hardware,
        "torch": torch.__version__,
        "shape": [args.layers, args.heads, args.head_dim],
        "page": args.page,
        "iters": args.iters,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    rows = []
    copies = {}
    for pools, tokens, budget, keys, slots, dst, cfg, region in cases(args, device, num_pages):
        kp, vp, kd, vd, fp8_src, fp8_dst = case_pools(pool_sets, pools, args.layers)
        res = pack_request(kp, vp, slots, cfg, out=region, fp8=fp8_src)
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            res = pack_request(kp, vp, slots, cfg, out=region, fp8=fp8_src)
            extra = torch.cuda.max_memory_allocated(device) - before
        else:
            extra = None
        pack = wall(
            lambda c=cfg, r=region, s=slots, k=kp, v=vp, f=fp8_src: pack_request(
                k, v, s, c, out=r, fp8=f
            ),
            args.iters,
            args.warmup,
            device,
        )
        unpack = wall(
            lambda r=region, d=dst, x=res, k=kd, v=vd, f=fp8_dst: unpack_request(
                r, k, v, d, expected_checksum=x.checksum, fp8=f
            ),
            args.iters,
            args.warmup,
            device,
        )
        k_pack = k_unpack = c_ms = None
        idle = (None, None)
        if device.type == "cuda":
            k_pack, k_unpack, idle = kernel_times(
                kp, vp, kd, vd, slots, dst, region, res, args.iters, args.warmup, fp8_dst
            )
            if tokens not in copies:
                copies[tokens] = copy_ms(res.full_nbytes, device, args.iters, 3)
            c_ms = copies[tokens]
        # the stock backend moves the prefill's pool bytes: 16-bit, or half of it in FP8
        baseline = res.full_nbytes // 2 if fp8_src else res.full_nbytes
        base = {
            "pools": pools,
            "prefill_dtype": fp8_src.name if fp8_src else "bfloat16",
            "decode_dtype": fp8_dst.name if fp8_dst else "bfloat16",
            "tokens": tokens,
            "budget": budget,
            "key_scales": keys,
            "pack_ms": round(pack, 4),
            "unpack_ms": round(unpack, 4),
            "kernel_pack_ms": None if k_pack is None else round(k_pack, 4),
            "kernel_unpack_ms": None if k_unpack is None else round(k_unpack, 4),
            "kernel_from_idle_ms": [None if t is None else round(t, 4) for t in idle],
            "copy_ms": None if c_ms is None else round(c_ms, 4),
            "packed_bytes": res.nbytes,
            "full_bytes": res.full_nbytes,
            "baseline_bytes": baseline,
            "ideal": round(res.full_nbytes / res.nbytes, 4),
            "tier_counts": res.tier_counts,
            "path": res.path,
            "pack_steps_ms": {k: round(v, 4) for k, v in res.timings_ms.items()},
            "pack_extra_bytes": extra,
            "hardware": hardware,
        }
        if c_ms:
            # bytes moved: the pack reads the prefill's pools and writes the payload
            moved = baseline + res.nbytes
            base["kernel_pack_vs_copy"] = round((moved / k_pack) / (2 * res.full_nbytes / c_ms), 4)
            base["kernel_unpack_vs_copy"] = round(
                (moved / k_unpack) / (2 * res.full_nbytes / c_ms), 4
            )
        for link in args.links:
            per_ms = link * 1e9 / 8 / 1e3  # bytes per ms
            full_t = res.full_nbytes / per_ms
            ours = pack + res.nbytes / per_ms + unpack
            rec = dict(base, link_gbps=link)
            rec["speedup"] = round(full_t / ours, 4)
            rec["speedup_vs_pool"] = round(baseline / per_ms / ours, 4)
            rec["of_ideal"] = round(rec["speedup"] / rec["ideal"], 4)
            target = TARGETS.get((link, tokens)) if pools == "bf16" else None
            rec["target_of_ideal"] = target
            rec["target_met"] = None if target is None else rec["of_ideal"] >= target
            rows.append(rec)
        print(
            f"{pools} T={tokens} b={budget} keys={keys} path={res.path} pack {pack:.2f} ms"
            f" (kernel {k_pack}) unpack {unpack:.2f} ms (kernel {k_unpack})"
            f" packed {res.nbytes / 1e6:.1f} MB of {res.full_nbytes / 1e6:.1f}"
            f" steps {base['pack_steps_ms']} extra {extra}",
            flush=True,
        )
        del region
    return rows, meta


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Request path: pack_request + wire + unpack_request",
        "",
        f"{meta['hardware']}, torch {meta['torch']}, triton {meta.get('triton', '-')};"
        f" KV {meta['shape'][0]} layers x {meta['shape'][1]} KV heads x {meta['shape'][2]},"
        f" bf16, page {meta['page']}, random pages; wall clock median of {meta['iters']}"
        " after warm-up (pack/unpack synchronise once at the end), kernels by CUDA events"
        " with the device kept busy while the host launches them (from an idle device,"
        " launch gaps included: the JSON's `kernel_from_idle_ms`).",
        "speedup = (full / link) / (pack + packed / link + unpack); ideal = full / packed"
        " (full: the 16-bit KV); vs pool: the same over the prefill pool's own bytes"
        " (half the 16-bit KV for FP8 pools, what mooncake with FP8 KV moves).",
        "",
        "| pools | tokens | b | keys | link Gb/s | pack ms | unpack ms | kernel pack / unpack ms"
        " | kernel vs copy (pack / unpack) | packed MB | speedup | vs pool | ideal | of ideal"
        " | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-"
        if r["target_of_ideal"] is not None:
            ok = "met" if r["target_met"] else "MISSED"
            target = f">= {r['target_of_ideal']}: {ok}"
        kern = f"{r['kernel_pack_ms']} / {r['kernel_unpack_ms']}"
        vs = f"{r.get('kernel_pack_vs_copy', '-')} / {r.get('kernel_unpack_vs_copy', '-')}"
        lines.append(
            f"| {r['pools']} | {r['tokens']} | {r['budget']} | {r['key_scales']}"
            f" | {r['link_gbps']} | {r['pack_ms']:.2f} | {r['unpack_ms']:.2f} | {kern} | {vs}"
            f" | {r['packed_bytes'] / 1e6:.1f} | {r['speedup']:.2f}x"
            f" | {r['speedup_vs_pool']:.2f}x | {r['ideal']:.2f}x | {r['of_ideal']:.2f}"
            f" | {target} |"
        )
    judged = [r for r in rows if r["target_met"] is not None]
    met = sum(bool(r["target_met"]) for r in judged)
    lines += ["", f"Targets met: {met} of {len(judged)}."]
    extra = [r["pack_extra_bytes"] for r in rows if r["pack_extra_bytes"] is not None]
    if extra:
        worst = max(rows, key=lambda r: r["pack_extra_bytes"] or 0)
        mb = worst["pack_extra_bytes"] / 1e6
        lines.append(
            f"Largest extra device memory of one pack_request: {mb:.1f}"
            f" MB at {worst['tokens']} tokens (full KV {worst['full_bytes'] / 1e6:.0f} MB)."
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    links = sorted({r["link_gbps"] for r in rows})
    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4), sharey=True)
    series = sorted({(r["pools"], r["key_scales"], r["budget"]) for r in rows})
    for ax, link in zip(axes if len(links) > 1 else [axes], links):
        for pools, keys, budget in series:
            sel = [
                r
                for r in rows
                if (r["link_gbps"], r["pools"], r["key_scales"], r["budget"])
                == (link, pools, keys, budget)
            ]
            ax.plot(
                [r["tokens"] for r in sel],
                [r["of_ideal"] for r in sel],
                marker="o" if keys == "token" else "s",
                ls="-" if pools == "bf16" else "--",
                label=f"{pools} {keys} b={budget}",
            )
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{link} Gb/s")
        ax.set_xlabel("tokens")
    (axes[0] if len(links) > 1 else axes).set_ylabel("speedup / ideal")
    (axes[0] if len(links) > 1 else axes).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def profile(args) -> None:
    """torch.profiler over a few pack_request / unpack_request calls per case: where
    the host time goes (self CPU per op) and the device time (per kernel)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    device, num_pages, pool_sets = setup(args)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for pools, tokens, budget, keys, slots, dst, cfg, region in cases(args, device, num_pages):
        kp, vp, kd, vd, fs, fd = case_pools(pool_sets, pools, args.layers)
        for _ in range(3):
            res = pack_request(kp, vp, slots, cfg, out=region, fp8=fs)
            unpack_request(region, kd, vd, dst, expected_checksum=res.checksum, fp8=fd)
        sync(device)
        for name, fn in (
            (
                "pack",
                lambda s=slots, c=cfg, r=region, k=kp, v=vp, f=fs: pack_request(
                    k, v, s, c, out=r, fp8=f
                ),
            ),
            (
                "unpack",
                lambda r=region, d=dst, x=res, k=kd, v=vd, f=fd: unpack_request(
                    r, k, v, d, expected_checksum=x.checksum, fp8=f
                ),
            ),
        ):
            t = time.perf_counter()
            for _ in range(5):
                fn()
            ms = (time.perf_counter() - t) / 5 * 1e3
            with tprofile(activities=acts) as prof:
                for _ in range(5):
                    fn()
            print(f"=== {pools} T={tokens} b={budget} keys={keys} {name}: {ms:.3f} ms/call")
            avg = prof.key_averages()
            print(avg.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48))
            if device.type == "cuda":
                print(
                    avg.table(
                        sort_by="self_device_time_total",
                        row_limit=14,
                        max_name_column_width=48,
                    )
                )
            if args.out:
                out = pathlib.Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                trace = f"trace_{pools}_{tokens}_{budget}_{keys}_{name}.json"
                prof.export_chrome_trace(str(out / trace))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--key-scales", nargs="+", default=["token", "channel"])
    ap.add_argument(
        "--pools",
        nargs="+",
        choices=list(POOLS),
        default=["bf16", "fp8_e4m3", "bf16-fp8_e4m3"],
        help="prefill-decode pool pairs (see the module docstring)",
    )
    ap.add_argument("--links", type=int, nargs="+", default=list(LINKS_GBIT))
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (tests the script)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables, no results")
    args = ap.parse_args(argv)
    if args.profile:
        profile(args)
        return
    if args.smoke:
        args.device, args.tokens, args.layers, args.heads, args.head_dim = "cpu", [64], 2, 2, 16
        args.page, args.iters, args.warmup = 8, 2, 1
        args.pools = list(POOLS)
    rows, meta = run(args)
    name = "request_path_smoke" if args.smoke else "request_path"
    write_results(args.out, name, {"meta": meta, "records": rows}, markdown(rows, meta))
    if not args.smoke:
        plot(rows, pathlib.Path(args.out) / f"{name}.png")


if __name__ == "__main__":
    main()
