"""Fused gather + quantise + pack: SGLang KV pools -> SpectrumKV payload bytes.

One launch covers every layer, K and V, and all three packed tiers (see
:mod:`.plan` for the work decomposition). Each program gathers ``BR`` (token,
head) rows of one tier from one pool through the slot table, encodes them and
writes them at their place in the payload, so the KV is read exactly once and
the payload written exactly once. The bytes equal :func:`codec.pack_tiers` on
the gathered KV: the quantiser repeats the reference's float32 steps (IEEE
divisions via ``div_rn``, no FMA contraction, fp16 rounding of scale and
minimum, a zero word stored as +0.0). With ``rotation="hadamard"`` the INT
tiers are rotated by a torch matmul first (fallback, see :func:`pack_payload`).
FP8 pools (uint8 bits, the layout's dtype and ``kv_scales`` say what they mean):
the top tier copies the bytes, the INT tiers quantise ``fp8 * scale``
(:func:`._fp8.from_fp8`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..codec import (
    SOURCE_DTYPES,
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
    Launch,
    head_range,
    interpreted,
    launch_options,
    pointer_table,
    pool_table,
    wire_dtype,
)
from ._fp8 import from_fp8, source_args
from ._quant import bf16_words, bf16_words_range, clamp_margin, codes, group_quantiser
from .channel import DEFAULT_TUNING, ChannelTuning, launch_pack_channel
from .checksum import fast_checksum
from .plan import (
    BLOCK_ELEMS,
    META_HEAD,
    META_STRIDE,
    TransferPlan,
    kernel_supported,
    plan_transfer,
)

_META_HEAD = tl.constexpr(META_HEAD)
_META_STRIDE = tl.constexpr(META_STRIDE)


@triton.jit
def _store_quantized(
    x,
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
    RZ: tl.constexpr,
    WORDS: tl.constexpr,
):
    """Quantise rows ``x`` ``[BR, D]`` (``codec.quantize``'s float32 steps, with fewer
    instructions: the pack is issue-bound) and store their codes and per-group (scale,
    minimum) pairs. INT4 puts element 2j in the low nibble of byte j.

    With ``WORDS``, ``x`` is ``[BR, D / 2]`` int32 words of bf16 pairs: min/max run on
    the packed pairs (``min.bf16x2``, exact: bf16 -> float32 is exact), two elements an
    instruction, and the widening is a shift and a mask (the interpreter, without
    inline PTX, reduces the even and odd halves instead: the same numbers). The halves
    are quantised apart and stored apart from each other's layout: a word's two codes
    are one 16-bit word (INT8) or byte (INT4) of ``code(2j) + (code(2j+1) << bits)``
    (the RZ codes' bias sits above bit 16 and is truncated away). Joining the halves
    back into element order would cost a transpose between threads (shuffles) the
    bytes do not need (sm_90: 14.8 against 18.0 SASS instructions an element of an
    INT8 program, ``bench/results/pack_ptx_triton3.6.0*.json``).
    """
    QMAX: tl.constexpr = (1 << BITS) - 1
    GS: tl.constexpr = D // G
    out = payload + seg
    if WORDS:
        wg = tl.reshape(x, [BR, G, GS // 2])
        even, odd, lo_a, lo_b, hi_a, hi_b = bf16_words_range(wg, 2, RZ)
        lo_x, hi_x = tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)
    else:
        xg = tl.reshape(x.to(tl.float32), [BR, G, GS])
        lo_x, hi_x = tl.min(xg, 2), tl.max(xg, 2)
    lo, hi, scale, mn, m, inv = group_quantiser(lo_x, hi_x, QMAX)
    clamped = tl.min(tl.min(clamp_margin(lo_x, hi_x, lo, hi, m, inv, QMAX), 1), 0) < 0.0
    m, inv = m[:, :, None], inv[:, :, None]
    half = dst[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :]
    if WORDS:
        if clamped:
            q_even = codes(even, m, inv, QMAX, True, RZ)
            q_odd = codes(odd, m, inv, QMAX, True, RZ)
        else:
            q_even = codes(even, m, inv, QMAX, False, RZ)
            q_odd = codes(odd, m, inv, QMAX, False, RZ)
        pair = tl.reshape(q_even + (q_odd << BITS), [BR, D // 2])
        if BITS == 8:
            words = out.to(tl.pointer_type(tl.uint16), bitcast=True)
            tl.store(words + half, pair.to(tl.uint16), mask=valid[:, None])
        else:
            tl.store(out + half, pair.to(tl.uint8), mask=valid[:, None])
    else:
        if clamped:
            q = tl.reshape(codes(xg, m, inv, QMAX, True, RZ), [BR, D])
        else:
            q = tl.reshape(codes(xg, m, inv, QMAX, False, RZ), [BR, D])
        if BITS == 8:
            row = dst[:, None] * D + tl.arange(0, D)[None, :]
            tl.store(out + row, q.to(tl.uint8), mask=valid[:, None])
        else:  # the low byte of q_odd*16 + q_even: no masks
            q_even, q_odd = tl.split(tl.reshape(q, [BR, D // 2, 2]))
            tl.store(out + half, ((q_odd << 4) + q_even).to(tl.uint8), mask=valid[:, None])
    sc = (out + n_seg * (H * D * BITS // 8)).to(tl.pointer_type(tl.float16), bitcast=True)
    pair = (dst[:, None, None] * G + tl.arange(0, G)[None, :, None]) * 2
    pair = pair + tl.arange(0, 2)[None, None, :]
    tl.store(sc + pair, tl.join(scale, mn), mask=valid[:, None, None])


@triton.jit
def block_rows(
    meta,
    rows,
    pid,
    layer,
    kv,
    num_layers,
    b1,
    b2,
    n0,
    n1,
    n2,
    h0,
    H: tl.constexpr,
    HP: tl.constexpr,
    D: tl.constexpr,
    BR: tl.constexpr,
    IDX: tl.constexpr,
):
    """Tier, segment and rows of block ``pid`` (the pack's and the unpack's), with the row
    arithmetic in ``IDX`` (int32 unless the request has ``2**31`` elements or more: half
    the integer instructions of int64).

    The tier-level numbers come as arguments (``b1``, ``b2``: first blocks of
    INT8 and INT4; ``n*``: tokens per tier) so that the only loads before the
    KV gather are the slot indices: each dependent round trip ahead of the
    gather costs the whole program its latency.

    Returns (tier, n_seg, seg, valid, dst, off, live): ``live`` ``[BR]`` the tier rows
    that exist (safe to read), ``valid`` those this layer holds (to write), ``dst``
    their segment rows, ``off`` int64 their element offsets in the pool (row ``r``:
    head ``h0 + r % H`` of ``HP`` per slot ``rows[list0 + r // H]``).
    """
    tier = (pid >= b1).to(tl.int32) + (pid >= b2).to(tl.int32)
    blk0 = tl.where(tier == 0, 0, tl.where(tier == 1, b1, b2))
    list0 = tl.where(tier == 0, 0, tl.where(tier == 1, n0, n0 + n1))
    n_tier = tl.where(tier == 0, n0, tl.where(tier == 1, n1, n2))
    r = ((pid - blk0) * BR).to(IDX) + tl.arange(0, BR).to(IDX)
    live = r < (n_tier * H).to(IDX)
    slot = tl.load(rows + list0 + r // H, mask=live, other=0)
    off = (slot * HP + h0 + r % H) * D
    e = _META_HEAD + (tier * num_layers + layer) * _META_STRIDE
    base = tl.load(meta + e).to(IDX)
    n_seg = tl.load(meta + e + 1)
    seg = tl.multiple_of(tl.load(meta + e + 2 + kv), 16)  # segments are 16-byte aligned
    return tier, n_seg, seg, live & (r >= base * H), r - base * H, off, live


@triton.jit(do_not_specialize=["blk_lo", "b1", "b2", "n0", "n1", "n2", "h0"])
def _pack_kernel(
    src_ptrs,  # int64 [2L]: K pools of layers 0..L-1, then V pools
    rows,  # int64 [N]: source row of each listed token (pool slot)
    meta,  # int64: plan table
    payload,  # uint8 [payload_nbytes]
    scales,  # float32 [2L]: FP8 scales, K of every layer then V (read when FP8)
    blk_lo,  # first block of this launch
    b1,
    b2,
    n0,
    n1,
    n2,  # first block of INT8 / INT4; tokens per tier
    num_layers,
    h0,  # first packed head of the pools
    SRC: tl.constexpr,  # pool dtype
    WIRE: tl.constexpr,  # FP16-tier wire dtype
    H: tl.constexpr,  # packed heads (the layout's)
    HP: tl.constexpr,  # heads per pool slot
    D: tl.constexpr,
    G: tl.constexpr,
    BR: tl.constexpr,
    RZ: tl.constexpr,  # round with add.rz (GPU); the interpreter lacks libdevice
    IDX: tl.constexpr,  # row arithmetic: tl.int32, or tl.int64 for huge requests
    WORDS: tl.constexpr,  # bf16 pools: move and reduce int32 words of bf16 pairs
    NKV: tl.constexpr = 2,  # 2: K and V (grid axis 1 = 2L); 1: only KV0
    KV0: tl.constexpr = 0,
    FP8: tl.constexpr = 0,  # uint8 pools of FP8 bits: 1 e4m3fn, 2 e5m2 (see ._fp8)
    INT_KEYS: tl.constexpr = True,  # False: INT8/INT4 keys are another kernel's (channel)
):
    pid = tl.program_id(0).to(IDX) + blk_lo
    layer = tl.program_id(1) // NKV
    kv = KV0 + tl.program_id(1) % NKV
    # FP16 rows of K and V; INT rows of V, and of K unless the channel kernel packs those
    if (kv == 1) | (pid < b1) | INT_KEYS:
        tier, n_seg, seg, valid, dst, off, live = block_rows(
            meta, rows, pid, layer, kv, num_layers, b1, b2, n0, n1, n2, h0, H, HP, D, BR, IDX
        )
        addr = tl.multiple_of(tl.load(src_ptrs + layer + kv * num_layers), 16)
        if WORDS:  # int32 words, each a pair of bf16 (the FP16 tier moves them as they are)
            pool = tl.multiple_of(addr.to(tl.pointer_type(tl.int32)), 16)
            x = tl.load(
                pool + (off // 2)[:, None] + tl.arange(0, D // 2)[None, :],
                mask=live[:, None],
                other=0,
            )
            out = (payload + seg).to(tl.pointer_type(tl.int32), bitcast=True)
            row = dst[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :]
        else:
            pool = tl.multiple_of(addr.to(tl.pointer_type(SRC)), 16)  # caching allocator: >= 256 B
            x = tl.load(
                pool + off[:, None] + tl.arange(0, D)[None, :], mask=live[:, None], other=0.0
            )
            out = (payload + seg).to(tl.pointer_type(WIRE), bitcast=True)
            row = dst[:, None] * D + tl.arange(0, D)[None, :]
        if tier == 0:  # rows out of a window (live, not valid) are read but not written
            tl.store(out + row, x.to(out.dtype.element_ty), mask=valid[:, None])
        else:
            if FP8:  # the INT tiers quantise the real values
                xq = from_fp8(x, FP8) * tl.load(scales + layer + kv * num_layers)
            else:
                xq = x
            if tier == 1:
                _store_quantized(xq, payload, seg, n_seg, dst, valid, 8, BR, H, D, G, RZ, WORDS)
            else:
                _store_quantized(xq, payload, seg, n_seg, dst, valid, 4, BR, H, D, G, RZ, WORDS)


# Launch shape of the pack kernel when the plan has the default one: (KV
# elements per program, warps), from the sweep on the H200 (bench/README.md).
# A plan built with an explicit other shape (plan_transfer's block_elems /
# num_warps, as the benchmark's sweep does) is launched as given.
PACK_SHAPE = (4096, 4)


def pack_shape(plan: TransferPlan) -> tuple[int, int, tuple[int, int, int, int]]:
    """(rows per program, warps, first block of each tier and the total) of the
    pack launch for ``plan`` (its own decomposition: unpack keeps the plan's)."""
    lay = plan.layout
    rows, warps = plan.block_rows, plan.num_warps
    if (rows, warps) == (max(1, BLOCK_ELEMS // lay.head_dim), 4):
        rows, warps = max(1, PACK_SHAPE[0] // lay.head_dim), PACK_SHAPE[1]
    if rows == plan.block_rows:
        return rows, warps, plan.block_starts
    starts = [0]
    for n in plan.counts:
        starts.append(starts[-1] + -(-n * lay.num_kv_heads // rows))
    return rows, warps, tuple(starts)


def _launch_pack(
    plan: TransferPlan,
    ptrs,
    rows,
    payload,
    dtype,
    tier_lo,
    tier_hi,
    place,
    values_only=False,
    int_keys=True,
) -> None:
    """Pack tiers ``tier_lo .. tier_hi - 1`` (0: FP16, 1: INT8, 2: INT4) of K and V, or of
    V alone (``values_only``), from heads ``place = (h0, HP)``: ``h0 ..`` of pools of
    ``HP`` heads per slot. ``int_keys=False``: every tier of V but only the FP16 tier of K
    (per-channel INT keys go through :mod:`.channel`): one launch where two would be."""
    args = (dtype, tier_lo, tier_hi, place, values_only, int_keys, payload.device)
    launch = plan.launch(("pack", *args), lambda: _pack_spec(plan, *args))
    if launch is not None:
        launch(ptrs, rows, payload)


def _pack_spec(
    plan: TransferPlan, dtype, tier_lo, tier_hi, place, values_only, int_keys, device
) -> Launch | None:
    """The :class:`Launch` of :func:`_launch_pack` (given: pool pointers, rows, payload);
    None when the tiers have no blocks."""
    block_rows, warps, starts = pack_shape(plan)
    blk_lo, blk_hi = starts[tier_lo], starts[tier_hi]
    if blk_hi <= blk_lo:
        return None
    lay = plan.layout
    nkv = 1 if values_only else 2
    grid = (blk_hi - blk_lo, nkv * lay.num_layers)
    # largest row-arithmetic value: (rows of a tier + a block) * head_dim
    huge = (sum(plan.counts) * lay.num_kv_heads + block_rows) * lay.head_dim >= 2**31
    scales, fp8 = source_args(plan.layout, dtype, device)
    # given per call: pool pointers, rows, payload
    args = (None, None, plan.meta, None, scales, blk_lo, *starts[1:3], *plan.counts)
    args += (lay.num_layers, place[0])
    options = dict(
        SRC=TL_DTYPES[dtype],
        WIRE=wire_dtype(dtype),
        H=lay.num_kv_heads,
        HP=place[1],
        D=lay.head_dim,
        G=lay.groups,
        BR=block_rows,
        RZ=not interpreted(_pack_kernel),
        IDX=tl.int64 if huge else tl.int32,
        WORDS=bf16_words(dtype, device, _pack_kernel),
        NKV=nkv,
        KV0=1 if values_only else 0,
        FP8=fp8,
        INT_KEYS=int_keys,
        num_warps=warps,
        **launch_options(device),
    )
    return Launch(_pack_kernel, grid, args, options)


def _launch_pack_int(
    plan: TransferPlan, ptrs, rows, payload, dtype, place, tuning: ChannelTuning = DEFAULT_TUNING
) -> None:
    """The INT8 and INT4 tiers: one launch, or V rows plus the per-channel key kernel."""
    if plan.layout.key_block:
        _launch_pack(plan, ptrs, rows, payload, dtype, 1, 3, place, values_only=True)
        launch_pack_channel(plan, ptrs, rows, payload, dtype, place, tuning)
    else:
        _launch_pack(plan, ptrs, rows, payload, dtype, 1, 3, place)


def rotate_rows(
    pools: Sequence[torch.Tensor], plan: TransferPlan, rows_of, out: torch.Tensor, h0: int = 0
) -> None:
    """Hadamard pre-step of the INT tiers (torch matmul, per tier and layer like
    the reference, so each matmul sees the reference's rows), heads ``h0 ..`` of the pools."""
    lay, n0 = plan.layout, plan.counts[0]
    rot = hadamard(lay.head_dim, out.device)
    heads = slice(h0, h0 + lay.num_kv_heads)
    for i, pool in enumerate(pools):
        for k in (Tier.INT8, Tier.INT4):
            lo, hi = plan.tier_range(int(k), i % lay.num_layers)
            if hi > lo:
                out[i, lo - n0 : hi - n0] = pool[rows_of(lo, hi), heads].float() @ rot


def int_scratch(
    plan: TransferPlan, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float32 scratch ``[2L, n_int, H, D]`` of the INT tiers' rotated rows and the
    scratch row of each of them (``-n0 ..``, so list index ``n0`` is row 0); None
    without INT-tier rows."""
    lay = plan.layout
    n0 = plan.counts[0]
    n_int = plan.rows.numel() - n0
    if not n_int:
        return None
    scratch = torch.empty(
        2 * lay.num_layers,
        n_int,
        lay.num_kv_heads,
        lay.head_dim,
        dtype=torch.float32,
        device=device,
    )
    return scratch, torch.arange(-n0, n_int, dtype=torch.int64, device=device)


def pack_payload(
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    plan: TransferPlan,
    out: torch.Tensor | None = None,
    heads: tuple[int, int] | None = None,
    channel_tuning: ChannelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """Run the pack kernel: the payload (uint8 ``[plan.payload_nbytes]``, pools' device).

    Args:
        k_pools, v_pools: per layer ``[num_slots, HP, D]`` contiguous bf16/fp16/fp32, or
            uint8 FP8 bits when ``plan.layout`` is an FP8 source (its ``kv_scales``).
        plan: from :func:`plan_transfer` with the request's slots.
        out: optional preallocated uint8 buffer of at least ``payload_nbytes``.
        heads: pack heads ``[h0, h1)`` of the pools (``h1 - h0`` = the layout's
            ``num_kv_heads``; read in place, no copy); None: all ``HP`` heads.
        channel_tuning: launch shape of the per-channel key kernel (same bytes).

    With ``rotation="hadamard"`` the FP16 tier is packed straight from the pools
    and the INT tiers from a float32 scratch ``[2L, n_int, H, D]`` rotated by
    :func:`rotate_rows` (torch matmul fallback, not fused).
    """
    lay = plan.layout
    dtype, ptrs = pool_table(lay, k_pools, v_pools, heads=heads)
    device = k_pools[0].device
    place = head_range(lay, int(k_pools[0].shape[1]), heads)
    if out is None:
        payload = torch.empty(plan.payload_nbytes, dtype=torch.uint8, device=device)
    else:
        payload = out if out.numel() == plan.payload_nbytes else out[: plan.payload_nbytes]
    if plan.gaps.numel():
        payload[plan.gaps] = 0
    if lay.rotation != "hadamard":
        if lay.key_block:  # FP16 K and V, INT V: one launch; INT K: the channel kernel
            _launch_pack(plan, ptrs, plan.rows, payload, dtype, 0, 3, place, int_keys=False)
            launch_pack_channel(plan, ptrs, plan.rows, payload, dtype, place, channel_tuning)
        else:
            _launch_pack(plan, ptrs, plan.rows, payload, dtype, 0, 3, place)
        return payload
    _launch_pack(plan, ptrs, plan.rows, payload, dtype, 0, 1, place)
    scratch_rows = int_scratch(plan, device)
    if scratch_rows is not None:
        scratch, local = scratch_rows
        pools = [*k_pools, *v_pools]
        rotate_rows(pools, plan, lambda lo, hi: plan.rows[lo:hi], scratch, place[0])
        table = pointer_table(list(scratch), device)
        scratch_place = (0, lay.num_kv_heads)  # the float32 scratch holds just these heads
        _launch_pack_int(plan, table, local, payload, torch.float32, scratch_place, channel_tuning)
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
    heads: tuple[int, int] | None = None,
) -> PackedKV:
    """Pack one request straight from SGLang's KV pools (the kernel twin of ``pack_tiers``).

    Args:
        k_pools, v_pools: per layer ``[num_slots, kv_heads, head_dim]`` (MHA pool
            layout), contiguous, bf16/fp16/fp32 (or uint8 FP8 bits for an FP8
            ``layout``), all on one device.
        slots: int ``[T]``: pool slot of each prompt position (layer ``l`` reads
            ``slots[layer_first_pos[l]:]``).
        layout: the request's :class:`KVLayout` (dtype must match the pools).
        tiers: uint8 ``[T]`` tier map.
        policy: informational header string.
        plan: reuse a plan built for the same layout, tiers and slots.
        checksum: ``"auto"`` (Triton on CUDA, the reference otherwise),
            ``"triton"`` or ``"torch"`` (:func:`codec.payload_checksum`); all equal.
        heads: pack heads ``[h0, h1)`` of the pools (the layout's ``num_kv_heads`` of
            them); None: the pools hold exactly the layout's heads.

    Returns:
        :class:`PackedKV` byte-identical to ``pack_tiers`` on the gathered KV (its heads).
        Layouts the kernels do not support fall back to that reference.
    """
    dtype, _ = pool_table(layout, k_pools, v_pools, heads=heads)
    if dtype != (torch.uint8 if layout.fp8 else SOURCE_DTYPES[layout.dtype]):
        raise SpectrumConfigError(f"layout dtype {layout.dtype} but pools are {dtype}")
    slots = torch.as_tensor(slots, device=k_pools[0].device).reshape(-1)
    if not kernel_supported(layout):
        slots = slots.long()
        h = slice(*(heads or (0, layout.num_kv_heads)))
        keys = [k[slots[f:], h] for k, f in zip(k_pools, layout.layer_first_pos)]
        values = [v[slots[f:], h] for v, f in zip(v_pools, layout.layer_first_pos)]
        return pack_tiers(keys, values, layout, tiers, policy)
    plan = plan or plan_transfer(layout, tiers, slots)
    payload = pack_payload(k_pools, v_pools, plan, heads=heads)
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
