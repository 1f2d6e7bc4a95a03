"""Host time of each step of a later layer-group part, each called alone many times
(``bench/part_cost.py --breakdown``): where the fixed per-part cost goes, without a
profiler's own overhead in the numbers (issue 17 item 5, the 0.3 ms target).

Steps, in the order ``transfer._pack_kernels`` runs them (CUDA only):

- ``part``: the whole later part, ``pack_request(..., tiers=ChunkTiers)``;
- ``check_pools``, ``pool_table``: the input checks and the kernels' pointer table (cached);
- ``launch_pack``, ``launch_channel``, ``checksum_parts``: our launchers (their Python and
  Triton's launch of FP16+V, channel keys, checksum), no synchronisation;
- ``triton_jit_launch`` / ``compiled_launch``: the checksum kernel launched through Triton's
  JIT ``run`` and through the compiled kernel's own launcher (``CompiledKernel[grid]``): the
  JIT's share of a launch;
- ``readback_pageable`` / ``readback_pinned``: the checksum pairs to the host (``tolist``
  of the device tensor, or a non-blocking copy to pinned memory and a stream
  synchronisation);
- ``encode_header``, ``header_pageable`` / ``header_pinned``: the header's encoding and its
  copy into the send region (pageable and synchronous, or pinned and non-blocking plus the
  synchronisation);
- ``stream_sync``, ``device_guard``, ``view``, ``empty``: an idle stream's
  synchronisation, ``torch.cuda.device`` in and out, one tensor view, one small
  allocation: the unit costs the others are made of.

Median host microseconds a call over batches of :data:`BATCH` calls (a synchronisation
between batches, not timed).
"""

from __future__ import annotations

import statistics
import time

import torch
from request_path import write_results
from sglang_spectrum.kernels import _common, channel, checksum, pack

from sglang_spectrum.config import SpectrumConfigError
from sglang_spectrum.pools import check_pools
from sglang_spectrum.wire import PackedHeader, encode_header

BATCH = 50
BATCHES = 40


def host_us(fn, batches: int = BATCHES, batch: int = BATCH) -> float:
    """Median host microseconds of one call of ``fn`` (batches of ``batch`` calls)."""
    for _ in range(batch):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        per_call.append((time.perf_counter() - t) * 1e6 / batch)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def steps(part, k_pools, v_pools, out, chosen) -> dict:
    """Name -> zero-argument callable of each step (see the module docstring)."""
    part()
    plan = chosen.plans[0]
    lay, dtype = plan.layout, k_pools[0].dtype
    _, ptrs = _common.pool_table(lay, k_pools, v_pools)
    place = (0, int(k_pools[0].shape[1]))
    # a payload region of its own (out holds one header and payload, not 4 KiB more)
    payload = torch.empty(4096 + plan.payload_nbytes, dtype=torch.uint8, device=out.device)[4096:]
    words = payload.view(torch.int32)[: payload.numel() // 64 * 16]
    sums = torch.empty(2 * checksum.HOST_ROWS, dtype=torch.int64, device=out.device)
    blocks, n = -(-words.numel() // 8192), words.numel()
    opts = _common.launch_options(out.device)

    def jit_launch():
        return checksum._checksum_kernel[(blocks,)](words, n, n, sums, BLOCK=8192, TAIL=16, **opts)

    compiled = jit_launch()
    pinned = torch.empty(4096, dtype=torch.uint8, pin_memory=True)
    pinned_sums = torch.empty(2 * blocks, dtype=torch.int64, pin_memory=True)
    stream = torch.cuda.current_stream()
    header = PackedHeader(
        layout=lay,
        tier_map=chosen.host_map,
        offsets=plan.offsets,
        payload_nbytes=plan.payload_nbytes,
        checksum=(1 << 62) - 12345,
        policy="spectrum/paper/3/b=0.5",
    )
    head = encode_header(header)

    def readback_pinned():
        pinned_sums.copy_(sums[: 2 * blocks], non_blocking=True)
        stream.synchronize()
        return pinned_sums.tolist()

    def header_pinned():
        n = len(head)
        pinned[:n] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        out[:n].copy_(pinned[:n], non_blocking=True)
        stream.synchronize()

    def device_guard():
        with torch.cuda.device(out.device):
            pass

    def run_compiled():
        compiled[(blocks, 1, 1)](words, n, n, sums, 8192, 16)

    return {
        "part": part,
        "check_pools": lambda: check_pools(k_pools, v_pools, SpectrumConfigError),
        "pool_table": lambda: _common.pool_table(lay, k_pools, v_pools),
        "launch_pack": lambda: pack._launch_pack(
            plan, ptrs, plan.rows, payload, dtype, 0, 3, place, int_keys=False
        ),
        "launch_channel": lambda: channel.launch_pack_channel(
            plan, ptrs, plan.rows, payload, dtype, place
        ),
        "checksum_parts": lambda: checksum.checksum_parts(payload),
        "triton_jit_launch": jit_launch,
        "compiled_launch": run_compiled,
        "readback_pageable": lambda: sums[: 2 * blocks].tolist(),
        "readback_pinned": readback_pinned,
        "encode_header": lambda: encode_header(header),
        "header_pageable": lambda: out[: len(head)].copy_(
            torch.frombuffer(bytearray(head), dtype=torch.uint8)
        ),
        "header_pinned": header_pinned,
        "stream_sync": stream.synchronize,
        "device_guard": device_guard,
        "view": lambda: out[64:],
        "empty": lambda: torch.empty(2, dtype=torch.int64, device=out.device),
    }


def breakdown(part, k_pools, v_pools, out, chosen, out_dir: str, hardware: str) -> dict:
    """Time every step (CUDA pools only; elsewhere a note), write ``part_breakdown``."""
    if out.device.type != "cuda":
        print("part breakdown: CUDA pools only (the kernel path)")
        return {}
    times = {}
    for name, fn in steps(part, k_pools, v_pools, out, chosen).items():
        try:
            times[name] = round(host_us(fn), 2)
        except Exception as e:  # noqa: BLE001 - a launcher API another Triton lacks
            times[name] = None
            print(f"{name}: {type(e).__name__}: {e}")
    lines = [
        "# Host time of a later part's steps, each alone",
        "",
        f"{hardware}, torch {torch.__version__}; median us a call over {BATCHES} batches of"
        f" {BATCH} (bench/part_breakdown.py).",
        "",
        "| step | host us |",
        "|---|---|",
        *(f"| {k} | {'-' if v is None else f'{v:.1f}'} |" for k, v in times.items()),
    ]
    result = {"hardware": hardware, "torch": torch.__version__, "host_us": times}
    write_results(out_dir, "part_breakdown", result, "\n".join(lines) + "\n")
    return times
