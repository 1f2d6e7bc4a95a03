"""Fused dequantise + scatter: SpectrumKV payload -> SGLang KV pools.

The mirror of :mod:`.pack`: one launch, grid ``(blocks, 2 * L)``; each program
reads ``BR`` (token, head) rows of one tier of one segment, dequantises them
(``q * scale + minimum`` in float32, then the pool dtype, as the reference)
and stores them at their pool slots. Dropped tokens are not listed, so their
slots are never written. With ``rotation="hadamard"`` the INT tiers go
through a float32 scratch and a torch matmul (fallback, not fused).

FP8 on either side (:mod:`._fp8`): an FP8 source's top tier is read as ``fp8 *
scale``; FP8 destination pools (uint8) store ``(x / scale)`` saturated to FP8 with
their own scales, or the source's bytes as they are when dtype and scales agree
(the same bytes the division would give, see :mod:`sglang_spectrum.fp8`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..codec import KVLayout, UnpackInfo, hadamard, header_tier_map, read_header
from ..config import SpectrumConfigError, SpectrumFormatError
from ..fp8 import FP8Pool, check_fp8_pools, pool_bytes, store_rows
from ..policy import Tier
from ._common import (
    TL_DTYPES,
    head_range,
    interpreted,
    launch_options,
    pointer_table,
    pool_table,
    wire_dtype,
)
from ._fp8 import dest_args, fp8_kind, from_fp8, scale_table, to_pool
from .channel import DEFAULT_TUNING, ChannelTuning, launch_unpack_channel
from .checksum import fast_checksum
from .pack import block_rows, int_scratch
from .plan import TransferPlan, kernel_supported, plan_transfer


@triton.jit
def _dequantize(
    payload,
    seg,
    n_seg,
    dst,
    valid,
    BITS: tl.constexpr,
    BR: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
):
    """float32 ``[BR, D]`` rows ``dst`` of an INT8/INT4 segment."""
    codes = payload + seg
    if BITS == 8:
        q = tl.load(
            codes + dst[:, None] * D + tl.arange(0, D)[None, :], mask=valid[:, None], other=0
        )
    else:
        c = tl.load(
            codes + dst[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :],
            mask=valid[:, None],
            other=0,
        )
        q = tl.reshape(tl.join(c & 15, c >> 4), [BR, D])
    sc = (codes + n_seg * (H * D * BITS // 8)).to(tl.pointer_type(tl.float16), bitcast=True)
    pair = (dst[:, None, None] * G + tl.arange(0, G)[None, :, None]) * 2
    pair = pair + tl.arange(0, 2)[None, None, :]
    s, m = tl.split(tl.load(sc + pair, mask=valid[:, None, None], other=0.0).to(tl.float32))
    xg = tl.reshape(q.to(tl.float32), [BR, G, D // G]) * s[:, :, None] + m[:, :, None]
    return tl.reshape(xg, [BR, D])


@triton.jit(do_not_specialize=["blk_lo", "b1", "b2", "n0", "n1", "n2", "h0"])
def _unpack_kernel(
    payload,  # uint8 [payload_nbytes]
    dst_ptrs,  # int64 [2L]: K pools of layers 0..L-1, then V pools
    rows,  # int64 [N]: destination row of each listed token (pool slot)
    meta,  # int64: plan table
    src_scales,  # float32 [2L]: an FP8 source's scales (K of every layer, then V)
    dst_scales,  # float32 [2L]: FP8 destination pools' scales
    blk_lo,  # first block of this launch
    b1,
    b2,
    n0,
    n1,
    n2,  # first block of INT8 / INT4; tokens per tier
    num_layers,
    h0,  # first written head of the pools
    DST: tl.constexpr,  # pool dtype
    WIRE: tl.constexpr,  # FP16-tier wire dtype
    H: tl.constexpr,  # packed heads (the layout's)
    HP: tl.constexpr,  # heads per pool slot
    D: tl.constexpr,
    G: tl.constexpr,
    BR: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    IDX: tl.constexpr = tl.int64,  # row arithmetic: tl.int32 unless the request is huge
    NKV: tl.constexpr = 2,  # 2: K and V (grid axis 1 = 2L); 1: only KV0
    KV0: tl.constexpr = 0,
    SFP8: tl.constexpr = 0,  # FP8 source (top tier of FP8 bits): 1 e4m3fn, 2 e5m2
    DFP8: tl.constexpr = 0,  # FP8 destination pools (uint8): 1 e4m3fn, 2 e5m2
    DDIV: tl.constexpr = False,  # some destination scale is not 1.0
    COPY: tl.constexpr = False,  # FP8 -> FP8 of the same dtype and scales: copy the top tier
):
    pid = tl.program_id(0).to(IDX) + blk_lo
    layer = tl.program_id(1) // NKV
    kv = KV0 + tl.program_id(1) % NKV
    tier, n_seg, seg, valid, dst, rows_off, _ = block_rows(
        meta, rows, pid, layer, kv, num_layers, b1, b2, n0, n1, n2, h0, H, HP, D, BR, IDX
    )
    idx = layer + kv * num_layers
    addr = tl.multiple_of(tl.load(dst_ptrs + idx), 16)
    pool = tl.multiple_of(addr.to(tl.pointer_type(DST)), 16)  # caching allocator: >= 256 B
    off = rows_off[:, None] + tl.arange(0, D)[None, :]
    sd = tl.load(dst_scales + idx)
    if tier == 0:
        src = (payload + seg).to(tl.pointer_type(WIRE), bitcast=True)
        x16 = tl.load(src + dst[:, None] * D + tl.arange(0, D)[None, :], mask=valid[:, None])
        if COPY:
            tl.store(pool + off, x16, mask=valid[:, None])
        else:
            if SFP8:
                xt = from_fp8(x16, SFP8) * tl.load(src_scales + idx)
            else:
                xt = x16
            tl.store(pool + off, to_pool(xt, sd, DST, SOFT_BF16, DFP8, DDIV), mask=valid[:, None])
    elif tier == 1:
        x8 = _dequantize(payload, seg, n_seg, dst, valid, 8, BR, H, D, G)
        tl.store(pool + off, to_pool(x8, sd, DST, SOFT_BF16, DFP8, DDIV), mask=valid[:, None])
    else:
        x4 = _dequantize(payload, seg, n_seg, dst, valid, 4, BR, H, D, G)
        tl.store(pool + off, to_pool(x4, sd, DST, SOFT_BF16, DFP8, DDIV), mask=valid[:, None])


def _launch_unpack_int(
    plan: TransferPlan,
    payload,
    ptrs,
    rows,
    dtype,
    place,
    fp8=None,
    tuning: ChannelTuning = DEFAULT_TUNING,
) -> None:
    """The INT8 and INT4 tiers: one launch, or V rows plus the per-channel key kernel."""
    _, b1, _, b3 = plan.block_starts
    if plan.layout.key_block:
        _launch_unpack(plan, payload, ptrs, rows, dtype, b1, b3, place, True, fp8)
        launch_unpack_channel(plan, payload, ptrs, rows, dtype, place, fp8, tuning)
    else:
        _launch_unpack(plan, payload, ptrs, rows, dtype, b1, b3, place, fp8=fp8)


def _launch_unpack(
    plan: TransferPlan,
    payload,
    ptrs,
    rows,
    dtype,
    blk_lo,
    blk_hi,
    place,
    values_only=False,
    fp8=None,
) -> None:
    """Unpack blocks ``blk_lo .. blk_hi - 1`` of K and V (or V alone) into heads ``place =
    (h0, HP)`` (``h0 ..`` of ``HP`` per slot) of pools of ``dtype`` (uint8: FP8 pools
    described by ``fp8``)."""
    if blk_hi <= blk_lo:
        return
    lay = plan.layout
    nkv = 1 if values_only else 2
    device = payload.device
    sfp8 = fp8_kind(lay.dtype)
    src_scales = scale_table(lay.kv_scales, lay.num_layers, device)
    dst_scales, dfp8, ddiv = dest_args(fp8, lay.num_layers, device)
    copy = bool(sfp8) and sfp8 == dfp8 and list(lay.kv_scales) == fp8.scales
    # largest row-arithmetic value: (rows of a tier + a block) * head_dim
    huge = (sum(plan.counts) * lay.num_kv_heads + plan.block_rows) * lay.head_dim >= 2**31
    _unpack_kernel[(blk_hi - blk_lo, nkv * lay.num_layers)](
        payload,
        ptrs,
        rows,
        plan.meta,
        src_scales,
        dst_scales,
        blk_lo,
        *plan.block_starts[1:3],
        *plan.counts,
        lay.num_layers,
        place[0],
        DST=TL_DTYPES[dtype],
        WIRE=wire_dtype(_wire_source(lay)),
        H=lay.num_kv_heads,
        HP=place[1],
        D=lay.head_dim,
        G=lay.groups,
        BR=plan.block_rows,
        SOFT_BF16=interpreted(_unpack_kernel) and dtype == torch.bfloat16,
        IDX=tl.int64 if huge else tl.int32,
        NKV=nkv,
        KV0=1 if values_only else 0,
        SFP8=sfp8,
        DFP8=dfp8,
        DDIV=ddiv,
        COPY=copy,
        num_warps=plan.num_warps,
        **launch_options(payload.device),
    )


def _wire_source(layout: KVLayout) -> torch.dtype:
    """torch dtype of the top tier's elements on the wire (uint8: FP8 bits)."""
    if layout.fp8:
        return torch.uint8
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(layout.dtype, torch.float32)


def unpack_payload(
    payload: torch.Tensor,
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    plan: TransferPlan,
    fp8: FP8Pool | None = None,
    heads: tuple[int, int] | None = None,
    channel_tuning: ChannelTuning = DEFAULT_TUNING,
) -> None:
    """Run the unpack kernel: write the payload's kept tokens into the pools.

    Args:
        payload: uint8 ``[>= plan.payload_nbytes]`` on the pools' device (already
            validated: this does no checking of the bytes).
        k_pools, v_pools: per layer ``[num_slots, HP, D]`` contiguous bf16/fp16/fp32, or
            uint8 FP8 pools described by ``fp8`` (dtype, the receiver's scales).
        plan: from :func:`plan_transfer` with the destination slots.
        heads: write heads ``[g0, g1)`` of the pools (``g1 - g0`` = the layout's
            ``num_kv_heads``), the others untouched; None: all ``HP`` heads.
        channel_tuning: launch shape of the per-channel key kernel (same writes).
    """
    lay = plan.layout
    dtype, ptrs = pool_table(lay, k_pools, v_pools, heads=heads)
    place = head_range(lay, int(k_pools[0].shape[1]), heads)
    if (dtype == torch.uint8) != (fp8 is not None):
        raise SpectrumConfigError(f"{dtype} pools: fp8 must describe uint8 pools, and only them")
    if not kernel_supported(lay, fp8_pools=fp8 is not None):
        raise SpectrumConfigError("Hadamard rotation with FP8 is not fused: use the torch codec")
    device = k_pools[0].device
    pools = [*k_pools, *v_pools]
    _, b1, _, b3 = plan.block_starts
    if lay.rotation != "hadamard":
        if lay.key_block:
            _launch_unpack(plan, payload, ptrs, plan.rows, dtype, 0, b1, place, fp8=fp8)
            _launch_unpack_int(plan, payload, ptrs, plan.rows, dtype, place, fp8, channel_tuning)
        else:
            _launch_unpack(plan, payload, ptrs, plan.rows, dtype, 0, b3, place, fp8=fp8)
        return
    _launch_unpack(plan, payload, ptrs, plan.rows, dtype, 0, b1, place)
    scratch_rows = int_scratch(plan, device)
    if scratch_rows is None:
        return
    scratch, local = scratch_rows
    n0 = plan.counts[0]
    table = pointer_table(list(scratch), device)
    scratch_place = (0, lay.num_kv_heads)  # the float32 scratch holds just these heads
    _launch_unpack_int(
        plan, payload, table, local, torch.float32, scratch_place, None, channel_tuning
    )
    rot = hadamard(lay.head_dim, device)
    h = slice(place[0], place[0] + lay.num_kv_heads)
    for i, pool in enumerate(pools):  # post-step per tier and layer, like decode_rows
        for k in (Tier.INT8, Tier.INT4):
            lo, hi = plan.tier_range(int(k), i % lay.num_layers)
            if hi > lo:
                pool[plan.rows[lo:hi], h] = (scratch[i, lo - n0 : hi - n0] @ rot).to(dtype)


def unpack_to_pools(
    buffer: torch.Tensor | bytes,
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    slots: torch.Tensor | Sequence[int],
    fp8: FP8Pool | None = None,
    heads: tuple[int, int] | None = None,
) -> UnpackInfo:
    """Validate a packed buffer and scatter its dequantised KV into the pools.

    The kernel twin of :func:`codec.unpack_kv`. Everything is validated first
    (:func:`codec.read_header`: prefix, header CRC, offsets, length, payload
    checksum; then pools and slots): on any error it raises
    :class:`SpectrumFormatError` and writes nothing.

    Args:
        buffer: the whole packed buffer, uint8 tensor (ideally already on the
            pools' device) or bytes.
        k_pools, v_pools: per layer ``[num_slots, kv_heads, head_dim]``: bf16/fp16/fp32,
            or FP8 (uint8 or float8) described by ``fp8``.
        slots: int ``[T]``: destination pool slot of each prompt position.
        fp8: FP8 destination pools: dtype and the receiver's per-layer scales.
        heads: write heads ``[g0, g1)`` of the pools (as many as the buffer holds);
            None: the pools hold exactly the buffer's heads.
    Returns:
        :class:`UnpackInfo` (dropped positions are not written).
    """
    header, payload = read_header(buffer, checksum=fast_checksum)
    layout = header.layout
    check_fp8_pools([*k_pools, *v_pools], fp8, layout.num_layers, SpectrumFormatError)
    if fp8 is not None:
        k_pools, v_pools = pool_bytes(k_pools), pool_bytes(v_pools)
    pool_table(layout, k_pools, v_pools, SpectrumFormatError, heads)
    device = k_pools[0].device
    slots = torch.as_tensor(slots)
    if slots.dim() != 1 or slots.numel() != layout.num_tokens or slots.dtype.is_floating_point:
        raise SpectrumFormatError(
            f"slots must be an integer vector of {layout.num_tokens} entries,"
            f" got shape {tuple(slots.shape)} dtype {slots.dtype}"
        )
    slots = slots.to(device=device, dtype=torch.int64)
    size = int(k_pools[0].shape[0])
    if int(slots.min()) < 0 or int(slots.max()) >= size:
        raise SpectrumFormatError(f"slots out of range for pools of {size} slots")
    tiers = header_tier_map(header)
    payload = payload.to(device)
    if kernel_supported(layout, fp8_pools=fp8 is not None):
        plan = plan_transfer(layout, tiers, slots)
        unpack_payload(payload, k_pools, v_pools, plan, fp8=fp8, heads=heads)
    else:
        from ..codec import iter_decoded_layers

        for layer, positions, k, v in iter_decoded_layers(header, payload):
            dst = slots[positions.to(device)]
            store_rows(k_pools[layer], dst, k, fp8, layer, key=True, heads=heads)
            store_rows(v_pools[layer], dst, v, fp8, layer, key=False, heads=heads)
    return UnpackInfo.of(header)
