"""Fused gather + quantise + pack: SGLang KV pools -> SpectrumKV payload bytes.

One launch covers every layer, K and V, and all three packed tiers (see
:mod:`.plan` for the work decomposition). Each program gathers ``BR`` (token,
head) rows of one tier from one pool through the slot table, encodes them and
writes them at their place in the payload, so the KV is read exactly once and
the payload written exactly once. The bytes equal :func:`codec.pack_tiers` on
the gathered KV: the quantiser repeats the reference's float32 steps (IEEE
divisions via ``div_rn``, no FMA contraction, fp16 rounding of scale and
minimum). With ``rotation="hadamard"`` the INT tiers are rotated by a torch
matmul first (fallback, see :func:`pack_payload`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ..codec import (
    PackedHeader,
    PackedKV,
    encode_header,
    hadamard,
    pack_tiers,
    payload_checksum,
)
from ..config import SpectrumConfigError
from ..policy import Tier
from ._common import (
    TL_DTYPES,
    interpreted,
    launch_options,
    pointer_table,
    pool_table,
    wire_dtype,
)
from .checksum import fast_checksum
from .plan import META_HEAD, META_STRIDE, TransferPlan, kernel_supported, plan_transfer

_META_HEAD = tl.constexpr(META_HEAD)
_META_STRIDE = tl.constexpr(META_STRIDE)


@triton.jit
def _locate(meta, pid, layer, kv, num_layers, b1, b2, n0, n1, n2, H: tl.constexpr,
            BR: tl.constexpr):
    """Tier, list start, segment rows and byte offset, and the rows of this block.

    The tier-level numbers come as arguments (``b1``, ``b2``: first blocks of
    INT8 and INT4; ``n*``: tokens per tier) so that the only loads before the
    KV gather are the slot indices: each dependent round trip ahead of the
    gather costs the whole program its latency.

    Returns (tier, list0, n_seg, seg, r, live, valid, dst): ``r`` int64 ``[BR]``
    tier rows, ``live`` those that exist (safe to read), ``valid`` those this
    layer holds (to write), ``dst`` their segment rows.
    """
    tier = (pid >= b1).to(tl.int32) + (pid >= b2).to(tl.int32)
    blk0 = tl.where(tier == 0, 0, tl.where(tier == 1, b1, b2))
    list0 = tl.where(tier == 0, 0, tl.where(tier == 1, n0, n0 + n1))
    n_tier = tl.where(tier == 0, n0, tl.where(tier == 1, n1, n2))
    e = _META_HEAD + (tier * num_layers + layer) * _META_STRIDE
    base = tl.load(meta + e)
    n_seg = tl.load(meta + e + 1)
    seg = tl.multiple_of(tl.load(meta + e + 2 + kv), 16)  # segments are 16-byte aligned
    r = (pid - blk0) * BR + tl.arange(0, BR).to(tl.int64)
    live = r < n_tier * H
    return tier, list0, n_seg, seg, r, live, live & (r >= base * H), r - base * H


@triton.jit
def _pool_rows(ptrs, rows, idx, list0, r, live, DT: tl.constexpr, H: tl.constexpr,
               D: tl.constexpr):
    """Element offsets ``[BR, D]`` of rows ``r`` in the pool ``ptrs[idx]`` and its base."""
    addr = tl.multiple_of(tl.load(ptrs + idx), 16)
    pool = tl.multiple_of(addr.to(tl.pointer_type(DT)), 16)  # caching allocator: >= 256 B
    slot = tl.load(rows + list0 + r // H, mask=live, other=0)
    off = (slot * H + r % H) * D
    return pool, off[:, None] + tl.arange(0, D)[None, :]


@triton.jit
def _clamp16(x):
    return tl.minimum(tl.maximum(x, -65504.0), 65504.0)


@triton.jit
def _quantize(x, BR: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, QMAX: tl.constexpr,
              RZ: tl.constexpr):
    """Reference quantiser on ``[BR, G*GS]``: codes, fp16 scale and minimum ``[BR, G]``.

    Same float32 steps as ``codec.quantize`` with fewer instructions (the pack is
    otherwise issue-bound): the clamp to the fp16 range runs per element only in
    blocks that exceed it (min/max commute with it); ``clamp(floor(v))`` is
    computed as ``floor(clamp(v))`` (equal for every non-NaN v), and with ``RZ``
    floor is a round-toward-zero add of 2**23 (full-rate FADD instead of
    FRND + F2I on the quarter-rate conversion pipe), so the code sits in the low
    bits of the returned int32 (mask it; the interpreter path returns it clean).
    """
    xg = tl.reshape(x.to(tl.float32), [BR, G, GS])
    lo, hi = tl.min(xg, 2), tl.max(xg, 2)
    if (tl.min(tl.min(lo, 1), 0) < -65504.0) | (tl.max(tl.max(hi, 1), 0) > 65504.0):
        xg = _clamp16(xg)
    lo, hi = _clamp16(lo), _clamp16(hi)
    scale = tl.math.div_rn(hi - lo, tl.full([BR, G], QMAX, tl.float32)).to(tl.float16)
    mn = lo.to(tl.float16)
    s = scale.to(tl.float32)
    safe = tl.where(s > 0, s, 1.0)  # 1/0 never computed
    inv = tl.where(s > 0, tl.math.div_rn(tl.full([BR, G], 1.0, tl.float32), safe), 0.0)
    v = (xg - mn.to(tl.float32)[:, :, None]) * inv[:, :, None] + 0.5
    v = tl.minimum(tl.maximum(v, 0.0), QMAX)
    if RZ:
        q = libdevice.add_rz(v, 8388608.0).to(tl.int32, bitcast=True)  # 2**23 + floor(v)
    else:
        q = tl.floor(v).to(tl.int32)
    return tl.reshape(q, [BR, G * GS]), scale, mn


@triton.jit
def _store_quantized(x, payload, seg, n_seg, dst, valid, BITS: tl.constexpr, BR: tl.constexpr,
                     H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, RZ: tl.constexpr):
    q, scale, mn = _quantize(x, BR, G, D // G, (1 << BITS) - 1, RZ)
    codes = payload + seg
    if BITS == 8:
        tl.store(codes + dst[:, None] * D + tl.arange(0, D)[None, :], q.to(tl.uint8),
                 mask=valid[:, None])
    else:  # element 2j in the low nibble, 2j+1 in the high one
        lo, hi = tl.split(tl.reshape(q, [BR, D // 2, 2]))
        tl.store(codes + dst[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :],
                 ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8), mask=valid[:, None])
    sc = (codes + n_seg * (H * D * BITS // 8)).to(tl.pointer_type(tl.float16), bitcast=True)
    pair = (dst[:, None, None] * G + tl.arange(0, G)[None, :, None]) * 2
    pair = pair + tl.arange(0, 2)[None, None, :]
    tl.store(sc + pair, tl.join(scale, mn), mask=valid[:, None, None])


@triton.jit(do_not_specialize=["blk_lo", "b1", "b2", "n0", "n1", "n2"])
def _pack_kernel(
    src_ptrs,  # int64 [2L]: K pools of layers 0..L-1, then V pools
    rows,  # int64 [N]: source row of each listed token (pool slot)
    meta,  # int64: plan table
    payload,  # uint8 [payload_nbytes]
    blk_lo,  # first block of this launch
    b1, b2, n0, n1, n2,  # first block of INT8 / INT4; tokens per tier
    num_layers,
    SRC: tl.constexpr,  # pool dtype
    WIRE: tl.constexpr,  # FP16-tier wire dtype
    H: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    BR: tl.constexpr,
    RZ: tl.constexpr,  # round with add.rz (GPU); the interpreter lacks libdevice
):
    pid = tl.program_id(0).to(tl.int64) + blk_lo
    layer = tl.program_id(1) // 2
    kv = tl.program_id(1) % 2
    tier, list0, n_seg, seg, r, live, valid, dst = _locate(
        meta, pid, layer, kv, num_layers, b1, b2, n0, n1, n2, H, BR)
    pool, off = _pool_rows(src_ptrs, rows, layer + kv * num_layers, list0, r, live, SRC, H, D)
    x = tl.load(pool + off, mask=live[:, None], other=0.0)  # rows out of a window: unused
    if tier == 0:
        out = (payload + seg).to(tl.pointer_type(WIRE), bitcast=True)
        tl.store(out + dst[:, None] * D + tl.arange(0, D)[None, :], x.to(WIRE),
                 mask=valid[:, None])
    elif tier == 1:
        _store_quantized(x, payload, seg, n_seg, dst, valid, 8, BR, H, D, G, RZ)
    else:
        _store_quantized(x, payload, seg, n_seg, dst, valid, 4, BR, H, D, G, RZ)


def _launch_pack(plan: TransferPlan, ptrs, rows, payload, dtype, blk_lo, blk_hi) -> None:
    if blk_hi <= blk_lo:
        return
    lay = plan.layout
    grid = (blk_hi - blk_lo, 2 * lay.num_layers)
    _pack_kernel[grid](
        ptrs, rows, plan.meta, payload, blk_lo, *plan.block_starts[1:3], *plan.counts,
        lay.num_layers,
        SRC=TL_DTYPES[dtype], WIRE=wire_dtype(dtype), H=lay.num_kv_heads, D=lay.head_dim,
        G=lay.groups, BR=plan.block_rows, RZ=not interpreted(_pack_kernel),
        num_warps=plan.num_warps, **launch_options(payload.device),
    )


def rotate_rows(
    pools: Sequence[torch.Tensor], plan: TransferPlan, rows_of, out: torch.Tensor
) -> None:
    """Hadamard pre-step of the INT tiers (torch matmul, per tier and layer like
    the reference, so each matmul sees the reference's rows)."""
    lay, n0 = plan.layout, plan.counts[0]
    rot = hadamard(lay.head_dim, out.device)
    for i, pool in enumerate(pools):
        for k in (Tier.INT8, Tier.INT4):
            lo, hi = plan.tier_range(int(k), i % lay.num_layers)
            if hi > lo:
                out[i, lo - n0 : hi - n0] = pool[rows_of(lo, hi)].float() @ rot


def pack_payload(
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    plan: TransferPlan,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the pack kernel: the payload (uint8 ``[plan.payload_nbytes]``, pools' device).

    Args:
        k_pools, v_pools: per layer ``[num_slots, H, D]`` contiguous bf16/fp16/fp32.
        plan: from :func:`plan_transfer` with the request's slots.
        out: optional preallocated uint8 buffer of at least ``payload_nbytes``.

    With ``rotation="hadamard"`` the FP16 tier is packed straight from the pools
    and the INT tiers from a float32 scratch ``[2L, n_int, H, D]`` rotated by
    :func:`rotate_rows` (torch matmul fallback, not fused).
    """
    lay = plan.layout
    dtype, ptrs = pool_table(lay, k_pools, v_pools)
    device = k_pools[0].device
    payload = torch.empty(plan.payload_nbytes, dtype=torch.uint8, device=device) if out is None \
        else out[: plan.payload_nbytes]
    if plan.gaps.numel():
        payload[plan.gaps] = 0
    pools = [*k_pools, *v_pools]
    _, b1, _, b3 = plan.block_starts
    if lay.rotation != "hadamard":
        _launch_pack(plan, ptrs, plan.rows, payload, dtype, 0, b3)
        return payload
    _launch_pack(plan, ptrs, plan.rows, payload, dtype, 0, b1)
    n0 = plan.counts[0]
    n_int = plan.rows.numel() - n0
    if n_int:
        scratch = torch.empty(2 * lay.num_layers, n_int, lay.num_kv_heads, lay.head_dim,
                              dtype=torch.float32, device=device)
        rotate_rows(pools, plan, lambda lo, hi: plan.rows[lo:hi], scratch)
        local = torch.arange(-n0, n_int, dtype=torch.int64, device=device)  # scratch rows
        _launch_pack(plan, pointer_table(list(scratch), device), local, payload,
                     torch.float32, b1, b3)
    return payload


def pack_from_pools(
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    slots: torch.Tensor,
    layout,
    tiers: torch.Tensor,
    policy: str = "",
    plan: TransferPlan | None = None,
    checksum: str = "auto",
) -> PackedKV:
    """Pack one request straight from SGLang's KV pools (the kernel twin of ``pack_tiers``).

    Args:
        k_pools, v_pools: per layer ``[num_slots, kv_heads, head_dim]`` (MHA pool
            layout), contiguous, bf16/fp16/fp32, all on one device.
        slots: int ``[T]``: pool slot of each prompt position (layer ``l`` reads
            ``slots[layer_first_pos[l]:]``).
        layout: the request's :class:`KVLayout` (dtype must match the pools).
        tiers: uint8 ``[T]`` tier map.
        policy: informational header string.
        plan: reuse a plan built for the same layout, tiers and slots.
        checksum: ``"auto"`` (Triton on CUDA, the reference otherwise),
            ``"triton"`` or ``"torch"`` (:func:`codec.payload_checksum`); all equal.

    Returns:
        :class:`PackedKV` byte-identical to ``pack_tiers`` on the gathered KV.
        Layouts the kernels do not support fall back to that reference.
    """
    dtype, _ = pool_table(layout, k_pools, v_pools)
    if str(dtype).removeprefix("torch.") != layout.dtype:
        raise SpectrumConfigError(f"layout dtype {layout.dtype} but pools are {dtype}")
    slots = torch.as_tensor(slots, device=k_pools[0].device).reshape(-1)
    if not kernel_supported(layout):
        slots = slots.long()
        keys = [k[slots[f:]] for k, f in zip(k_pools, layout.layer_first_pos)]
        values = [v[slots[f:]] for v, f in zip(v_pools, layout.layer_first_pos)]
        return pack_tiers(keys, values, layout, tiers, policy)
    plan = plan or plan_transfer(layout, tiers, slots)
    payload = pack_payload(k_pools, v_pools, plan)
    use_triton = checksum == "triton" or (checksum == "auto" and payload.is_cuda)
    header = PackedHeader(
        layout=layout,
        tier_map=plan.tiers.numpy().tobytes(),
        offsets=plan.offsets,
        payload_nbytes=plan.payload_nbytes,
        checksum=fast_checksum(payload) if use_triton else payload_checksum(payload),
        policy=policy,
    )
    return PackedKV(header=header, header_bytes=encode_header(header), payload=payload)


__all__ = ["pack_from_pools", "pack_payload", "rotate_rows"]
