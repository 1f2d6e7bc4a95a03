"""Launch shapes of the per-channel key kernels (``kernels/channel.py``), on the GPU.

A per-channel key block is ``key_block`` (64) scattered token slots; one program reads
one head of each (``head_dim`` bf16 = 256 bytes) unless it loops over heads, so the
launch shape decides how much of each DRAM burst a read uses. For each
:class:`~sglang_spectrum.kernels.ChannelTuning` this times ``pack_payload`` and
``unpack_payload`` of a Llama-3-8B-shaped request (channel keys, CUDA events behind a spin
kernel as ``bench/request_path.events``: the kernels' time without the host's launch gaps
(since 2026-12-06 s18), median of ``--iters``), checks that the payload and the written
pools equal the default shape's, and reports the pack's bandwidth against a same-size ``copy_`` (as
``bench/request_path.py``: pool bytes read + payload written over 2 x full bytes).

Usage (H200)::

    python bench/channel_kernel.py --out bench/results
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from request_path import (  # noqa: E402
    copy_ms,
    events,
    gpu_bench_parser,
    make_pools,
    paged_slots,
    run_gpu_bench,
)

from sglang_spectrum import kernels as K  # noqa: E402
from sglang_spectrum.codec import header_tier_map, read_header  # noqa: E402
from sglang_spectrum.config import SpectrumConfig  # noqa: E402
from sglang_spectrum.transfer import pack_request, packed_size_bound  # noqa: E402

SHAPES = [  # (head_major, heads_per_program (0: all), channels (0: auto), num_warps (0: auto),
    #          narrow: the 16-bit tile kept through min/max; False where not given,
    #          max_registers: a thread's register cap; 0 where not given,
    #          fill_rows: rows past a block's tokens repeat its first; False where not given,
    #          channel_group: adjacent channels a group of the pack's tile; 0 where not given,
    #          words: bf16 read as int32 words, the main pack's quantiser; False where not given,
    #          load_bytes: the word loads' promised alignment; 16 where not given)
    (True, 1, 0, 0),  # the default until 2026-12-05 (2 warps for the pack, 4 for the unpack)
    (False, 1, 0, 8),  # the shape before this benchmark
    (False, 1, 0, 4),
    (True, 1, 0, 8),
    (True, 1, 0, 4),
    (True, 1, 0, 2),
    (True, 2, 0, 4),
    (True, 1, 64, 2),
    (True, 1, 64, 4),
    (False, 0, 0, 8),
    (False, 0, 0, 4),
    (False, 0, 0, 2),
    (False, 0, 64, 4),
    (True, 1, 64, 1),
    (True, 1, 32, 1),
    (True, 1, 32, 2),
    (True, 1, 0, 0, True),
    (True, 1, 64, 1, True),  # 17: the default 2026-12-05 to 2026-12-06
    (True, 1, 64, 2, True),
    (True, 1, 0, 1, True),
    (True, 1, 32, 1, True),
    (True, 1, 64, 1, True, 168),  # register caps of the default (2026-12-05, H100 ncu)
    (True, 1, 64, 1, True, 128),
    (True, 1, 64, 2, True, 128),
    (True, 1, 64, 2, True, 96),
    (True, 1, 64, 4, True, 64),
    (True, 1, 64, 1, True, 0, True),  # the default with fill_rows (2026-12-05, s13)
    (True, 1, 64, 2, True, 0, True),
    (True, 1, 64, 1, True, 0, True, 8),  # 28-32: channel groups (2026-12-05, s14: sm_90 SASS
    (True, 1, 64, 1, True, 0, True, 4),  # an element 19.1 / 19.1 / 21.7 / 22.3 / 24.4
    (True, 1, 32, 1, True, 0, True, 4),  # against 23.0 for 26 and 25.9 for the default,
    (True, 1, 64, 2, True, 0, True, 4),  # registers 232 / 254 / 147 / 148 / 134)
    (True, 1, 32, 1, True, 0, True, 8),
    (True, 1, 64, 1, True, 0, True, 1, True),  # 33-37: words (s14, sm_90 SASS an element
    (True, 1, 128, 2, True, 0, True, 1, True),  # under Triton 3.6: 14.0 / 13.9 / 20.3 / 20.5
    (True, 1, 32, 1, True, 0, True, 1, True),  # / 13.8; 8 / 8 / 16 / 16 / 8 warps an SM;
    (True, 1, 64, 2, True, 0, True, 1, True),  # 37's groups of 8 spill under Triton 3.9)
    (True, 1, 64, 1, True, 0, True, 8, True),
    (True, 1, 64, 1, True, 0, True, 1, True, 4),  # 38-41: 33, 33, 35, 36 with a thread a
    (True, 1, 64, 1, True, 0, True, 1, True, 8),  # word (8: two) of every row (s15, sm_90
    (True, 1, 32, 1, True, 0, True, 1, True, 4),  # SASS an element under Triton 3.6: 11.7 /
    (True, 1, 64, 2, True, 0, True, 1, True, 4),  # 11.6 / 14.1 / 14.4; registers 254 / 224
]  # / 114 / 127; 33 after s15's shared quantiser steps: 13.8); 40 the default since 2026-12-06


def default_index() -> int:
    """The index in :data:`SHAPES` of ``kernels.channel.DEFAULT_TUNING``: every sweep
    times it, the baseline of ``bench/pick_channel_default.py``."""
    from sglang_spectrum.kernels.channel import DEFAULT_TUNING

    return next(i for i, s in enumerate(SHAPES) if K.ChannelTuning(*s) == DEFAULT_TUNING)


def compiled_variants() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of the two kernels
    (Triton's JIT cache: ``device_caches[device][0]``; empty where its layout differs)."""
    from sglang_spectrum.kernels.channel import _pack_channel_kernel, _unpack_channel_kernel

    rows = []
    for fn in (_pack_channel_kernel, _unpack_channel_kernel):
        try:
            for entry in fn.device_caches.values():
                for kernel in entry[0].values():
                    meta = kernel.metadata
                    rows.append(
                        {
                            "kernel": fn.__name__,
                            "num_warps": meta.num_warps,
                            "maxnreg": getattr(meta, "maxnreg", None),
                            "n_regs": getattr(kernel, "n_regs", None),
                            "n_spills": getattr(kernel, "n_spills", None),
                            "shared": getattr(meta, "shared", None),
                        }
                    )
        except (AttributeError, IndexError, TypeError) as e:
            rows.append({"kernel": fn.__name__, "error": repr(e)})
    return rows


def time_shape(shape, kp, vp, kd, vd, plan, uplan, payload, args) -> tuple[float, float, bool]:
    """(pack ms, unpack ms, payload equals ``payload``) of one launch shape; the unpack
    writes into ``kd, vd`` (zeroed first: a shape that skips rows must not pass on the
    previous shape's writes)."""
    scratch = torch.empty(plan.payload_nbytes, dtype=torch.uint8, device=payload.device)
    pack = events(
        lambda: K.pack_payload(kp, vp, plan, out=scratch, channel_tuning=shape),
        args.iters,
        args.warmup,
    )
    for p in kd:
        p.zero_()
    unpack = events(
        lambda: K.unpack_payload(payload, kd, vd, uplan, channel_tuning=shape),
        args.iters,
        args.warmup,
    )
    return pack, unpack, torch.equal(scratch, payload)


def run(args) -> dict:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    num_pages = -(-max(args.tokens) // args.page) + 8
    kp, vp = make_pools(
        args.layers, args.heads, args.head_dim, num_pages * args.page, torch.bfloat16, device, gen
    )
    kd = [torch.zeros_like(p) for p in kp]
    vd = [torch.zeros_like(p) for p in vp]
    host_gen = torch.Generator().manual_seed(0)
    records = []
    for tokens in args.tokens:
        slots = paged_slots(tokens, args.page, num_pages, host_gen, device)
        dst = paged_slots(tokens, args.page, num_pages, host_gen, device)
        for budget in args.budgets:
            cfg = SpectrumConfig(budget=budget, key_scales="channel", allow_drop=False)
            shape = (tokens, args.layers, args.heads, args.head_dim, "bfloat16")
            bound = packed_size_bound(*shape, cfg)
            region = torch.empty(bound, dtype=torch.uint8, device=device)
            res = pack_request(kp, vp, slots, cfg, out=region)
            header, payload = read_header(region[: res.nbytes], checksum=K.fast_checksum)
            tiers = header_tier_map(header).to(device)
            counts = tuple(res.tier_counts[n] for n in ("fp16", "int8", "int4"))
            plan = K.plan_from_counts(header.layout, tiers, counts, slots)
            uplan = K.plan_from_counts(header.layout, tiers, counts, dst)
            copy = copy_ms(res.full_nbytes, device, args.iters, 3)
            moved = res.full_nbytes + res.nbytes
            reference = None
            chosen = args.select if args.select else range(min(args.shapes, len(SHAPES)))
            for index in chosen:
                shape = K.ChannelTuning(*SHAPES[index])
                pack, unpack, same = time_shape(shape, kp, vp, kd, vd, plan, uplan, payload, args)
                if reference is None:
                    reference = [p.clone() for p in kd]
                same = same and all(torch.equal(a, b) for a, b in zip(reference, kd))
                rec = {
                    "shape": index,
                    "tokens": tokens,
                    "budget": budget,
                    **dataclasses.asdict(shape),  # every ChannelTuning field, by name
                    "kernel_pack_ms": round(pack, 4),
                    "kernel_unpack_ms": round(unpack, 4),
                    "copy_ms": round(copy, 4),
                    "kernel_pack_vs_copy": round((moved / pack) / (2 * res.full_nbytes / copy), 4),
                    "kernel_unpack_vs_copy": round(
                        (moved / unpack) / (2 * res.full_nbytes / copy), 4
                    ),
                    "same_bytes": same,
                }
                records.append(rec)
                print(json.dumps(rec), flush=True)
            del region
    return {
        "hardware": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,  # the grouped tiles' layouts depend on it
        "shape": [args.layers, args.heads, args.head_dim],
        "records": records,
        "compiled": compiled_variants(),
    }


def markdown(result: dict) -> str:
    lines = [
        "# Per-channel key kernels: launch shapes",
        "",
        f"{result['hardware']}, torch {result['torch']}, triton {result.get('triton', '?')};"
        f" KV {result['shape']} bf16, channel"
        " keys; whole pack_payload / unpack_payload (V rows and FP16 keys included), CUDA"
        " events; `vs copy`: bandwidth over a same-size `copy_`.",
        "",
        "| tokens | b | head-major | heads/program | channels | warps | narrow | register cap"
        " | fill rows | channel group | words | load bytes | pack ms | unpack ms | pack vs copy"
        " | unpack vs copy | same bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['tokens']} | {r['budget']} | {r['head_major']}"
            f" | {r['heads_per_program'] or 'all'} | {r['channels'] or 'auto'}"
            f" | {r['num_warps'] or 'auto'} | {r.get('narrow', False)}"
            f" | {r.get('max_registers') or '-'} | {r.get('fill_rows', False)}"
            f" | {r.get('channel_group') or '-'} | {r.get('words', False)}"
            f" | {r.get('load_bytes', 16)}"
            f" | {r['kernel_pack_ms']}"
            f" | {r['kernel_unpack_ms']} | {r['kernel_pack_vs_copy']}"
            f" | {r['kernel_unpack_vs_copy']} | {r['same_bytes']} |"
        )
    lines += ["", "Compiled variants (registers per thread, spills, shared memory bytes):", ""]
    lines += [f"- {c}" for c in result.get("compiled", [])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = gpu_bench_parser(__doc__, tokens=[16384, 4096], budgets=[0.3])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N of SHAPES")
    ap.add_argument("--select", type=int, nargs="*", help="these indices of SHAPES (0 first)")
    run_gpu_bench("channel_kernel", ap.parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
