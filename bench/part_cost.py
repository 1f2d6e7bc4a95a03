"""Per-part cost of a chunk sent in layer groups (``--spectrum-layer-group``, issue 17
item 5: "the per-part host cost under 0.3 ms").

A layer-pipelined prefill packs each chunk as parts of N layers with the very function
the backend calls, ``transfer.pack_request`` on ``pools[l0:l1]``: the first group scores,
allocates and plans; every later group packs with the first group's tier map. This
times, per chunk size, the whole call (wall clock: ``pack_request`` synchronises once at
its end, so this is what the packer thread pays per part, host and device) of

- ``first``: group 0 (score + allocate + plan + pack);
- ``tensor``: a later group given the map as a plain tensor (``tiers=info.tier_map``:
  a count readback, a new plan and a map readback per part; before 2026-12-05);
- ``chunk_tiers``: a later group given ``ChunkTiers.of(info)`` (what the prefill passes
  since: counts on the host, the plan and the host map built once per layout),

and the device time of the same calls (CUDA events; on CPU 0). At small chunks the
device work is negligible and the wall clock is the fixed per-part cost the target
bounds. Every mode packs the same bytes (checked). Pools: the Llama-3-8B shape of
``bench/request_path.py`` (its generator), paged.

``--profile``: then, at the smallest chunk, the host functions of 50 later parts
(``cProfile``, by cumulative time) and their CUDA/torch calls (``torch.profiler``, by CPU
time), printed: where a later part's fixed cost goes. ``--breakdown``: at the smallest
chunk, the host time of each step of a later part called alone, many times (no profiler
in the way; ``part_breakdown.{json,md}``).

Usage (H200)::

    python bench/part_cost.py --out bench/results
    python bench/part_cost.py --tokens 16 --profile --out /tmp/pc
    python bench/part_cost.py --tokens 16 --breakdown --out /tmp/pc
    python bench/part_cost.py --smoke --out /tmp/pc    # CPU, tiny shapes (torch path)
"""

from __future__ import annotations

import functools
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from request_path import (  # noqa: E402
    event_ms,
    gpu_bench_parser,
    make_pools,
    paged_slots,
    sync,
    write_results,
)

from sglang_spectrum.config import SpectrumConfig  # noqa: E402
from sglang_spectrum.transfer import ChunkTiers, pack_request, packed_size_bound  # noqa: E402

MODES = ("first", "tensor", "chunk_tiers")
TARGET_MS = 0.3  # issue 17 item 5: host cost per part


def part_times(fn, iters: int, warmup: int, device: torch.device) -> tuple[float, float, dict]:
    """(median wall ms, median device ms, median ``timings_ms`` stages) of ``fn``, a
    ``pack_request`` call (it synchronises itself)."""
    for _ in range(warmup):
        fn()
    sync(device)
    walls, devs, infos = [], [], []
    for _ in range(iters):
        t = time.perf_counter()
        if device.type == "cuda":
            devs.append(event_ms(lambda: infos.append(fn())))
        else:
            infos.append(fn())
        walls.append((time.perf_counter() - t) * 1e3)
    stages = [info.timings_ms for info in infos]
    stage = {k: round(statistics.median(s[k] for s in stages), 4) for k in stages[0]}
    return statistics.median(walls), statistics.median(devs) if devs else 0.0, stage


def profile_part(fn, calls: int = 50) -> None:
    """Print where ``calls`` runs of ``fn`` (a later part) spend host time."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    print(f"== cProfile: {calls} later parts, by cumulative time ==")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as tprof:
        for _ in range(calls):
            fn()
    print(f"== torch.profiler: {calls} later parts, by CPU time ==")
    print(tprof.key_averages().table(sort_by="cpu_time_total", row_limit=30))


def run(args) -> tuple[list[dict], dict]:
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    num_pages = -(-max(args.tokens) // args.page) + 8
    kp, vp = make_pools(
        args.layers, args.heads, args.head_dim, num_pages * args.page, torch.bfloat16, device, gen
    )
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    group = args.layer_group
    rows = []
    for tokens in args.tokens:
        slots = paged_slots(tokens, args.page, num_pages, torch.Generator().manual_seed(1), device)
        cfg = SpectrumConfig(budget=args.budgets[0], allow_drop=False, key_scales=args.key_scales)
        cfg = cfg.with_(window=0)  # an earlier chunk's part, as the prefill packs it
        bound = packed_size_bound(tokens, group, args.heads, args.head_dim, torch.bfloat16, cfg)
        out = torch.empty(bound, dtype=torch.uint8, device=device)
        k0, v0 = kp[:group], vp[:group]
        k1, v1 = kp[group : 2 * group], vp[group : 2 * group]
        first = pack_request(k0, v0, slots, cfg, out=out)
        chosen = ChunkTiers.of(first)
        pack = functools.partial(pack_request, slots=slots, config=cfg, out=out)
        calls = {
            "first": functools.partial(pack, k0, v0),
            "tensor": functools.partial(pack, k1, v1, tiers=first.tier_map),
            "chunk_tiers": functools.partial(pack, k1, v1, tiers=chosen),
        }
        packed = {}
        for mode, fn in calls.items():
            wall_ms, device_ms, stages = part_times(fn, args.iters, args.warmup, device)
            info = fn()
            packed[mode] = (info.nbytes, info.checksum)
            rows.append(
                {
                    "hardware": hardware,
                    "tokens": tokens,
                    "layers": group,
                    "mode": mode,
                    "wall_ms": round(wall_ms, 4),
                    "device_ms": round(device_ms, 4),
                    "stages_ms": stages,  # pack_request's own: plan, pack (+ readback), header
                    "path": info.path,
                    "packed_bytes": info.nbytes,
                }
            )
        if packed["tensor"] != packed["chunk_tiers"]:
            raise AssertionError(f"{tokens} tokens: ChunkTiers packed other bytes {packed}")
        if args.profile and tokens == min(args.tokens):
            profile_part(calls["chunk_tiers"], 5 if args.smoke else 50)
        if args.breakdown and tokens == min(args.tokens):
            from part_breakdown import breakdown  # noqa: PLC0415

            breakdown(calls["chunk_tiers"], k1, v1, out, chosen, args.out, hardware)
    meta = {
        "hardware": hardware,
        "torch": torch.__version__,
        "shape": f"{args.layers} layers x {args.heads} KV heads x {args.head_dim}, bf16",
        "layer_group": group,
        "budget": args.budgets[0],
        "key_scales": args.key_scales,
        "iters": args.iters,
        "target_ms": TARGET_MS,
    }
    return rows, meta


def markdown(rows: list[dict], meta: dict) -> str:
    by = {(r["tokens"], r["mode"]): r for r in rows}
    out = [
        "# Per-part cost of a chunk sent in layer groups",
        "",
        f"{meta['hardware']}, torch {meta['torch']}; {meta['shape']}; parts of"
        f" {meta['layer_group']} layers, b={meta['budget']:g}, {meta['key_scales']} key"
        f" scales; median of {meta['iters']}. Wall: the whole `pack_request` call (it"
        " synchronises at its end) with the CUDA events that time it on the device (two"
        " records and their synchronisation inside the wall); device: those events. Own:"
        " `pack_request`'s own clock (`timings_ms['total']`: entry to its last"
        " synchronisation, what the packer thread pays a part), split into host (its own"
        " work) and wait (blocked in its synchronisations: the device's pack and checksum),"
        f" and its stages. Target: a later part's host cost < {meta['target_ms']} ms (the"
        " device's share is the pack bandwidth target's).",
        "",
        "| tokens | first wall (device) ms | later, tensor map | later, ChunkTiers"
        " | ChunkTiers / tensor | ChunkTiers own ms | host / wait ms"
        " | its stages: plan / pack / header ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tokens in sorted({r["tokens"] for r in rows}):
        cells = [
            f"{by[tokens, m]['wall_ms']:.3f} ({by[tokens, m]['device_ms']:.3f})" for m in MODES
        ]
        ratio = by[tokens, "chunk_tiers"]["wall_ms"] / max(by[tokens, "tensor"]["wall_ms"], 1e-9)
        st = by[tokens, "chunk_tiers"].get("stages_ms", {})
        split = " / ".join(f"{st[k]:.3f}" for k in ("plan", "pack", "header") if k in st)
        own = f"{st['total']:.3f}" if "total" in st else "-"
        host = f"{st['host']:.3f} / {st['wait']:.3f}" if "host" in st else "-"  # kernel path
        out.append(
            f"| {tokens} | " + " | ".join(cells) + f" | {ratio:.2f} | {own} | {host} | {split} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> list[dict]:
    ap = gpu_bench_parser(__doc__, tokens=[16, 256, 2048, 8192], budgets=[0.5])  # (the first)
    ap.add_argument("--layer-group", type=int, default=8)
    ap.add_argument("--key-scales", choices=("channel", "token"), default="channel")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (tests the script)")
    ap.add_argument("--profile", action="store_true", help="print a later part's host profile")
    ap.add_argument("--breakdown", action="store_true", help="time a later part's steps alone")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.tokens, args.layers, args.heads, args.head_dim = "cpu", [16, 64], 4, 2, 16
        args.layer_group, args.page, args.iters, args.warmup = 2, 8, 2, 1
    if 2 * args.layer_group > args.layers:
        ap.error(f"--layer-group {args.layer_group} needs at least {2 * args.layer_group} layers")
    rows, meta = run(args)
    name = "part_cost_smoke" if args.smoke else "part_cost"
    write_results(args.out, name, {"meta": meta, "records": rows}, markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
