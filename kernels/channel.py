"""Per-channel (KIVI) key scales in the kernels: the INT8/INT4 key segments of layouts
with ``key_block > 0`` (``key_scales="channel"``), packed and unpacked by their own
kernels, one program per (key block, head group and channel chunk, layer). Same float32
steps as ``codec.quantize_channels`` / ``dequantize_channels``; FP8 pools on either
side as in :mod:`.pack` / :mod:`.unpack`.

Launch shape (:class:`ChannelTuning`, chosen on the H200 by ``bench/channel_kernel.py``):
a key block's rows are scattered token slots, and one head of a row is only ``D``
elements, so which programs run side by side decides how much of each DRAM row a read
uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import TL_DTYPES, Launch, interpreted, launch_options
from ._fp8 import dest_args, from_fp8, source_args, to_pool
from ._quant import bf16_words, bf16_words_range, clamp_margin, codes, group_quantiser
from .plan import META_HEAD, META_STRIDE, TransferPlan

_META_HEAD = tl.constexpr(META_HEAD)
_META_STRIDE = tl.constexpr(META_STRIDE)


@dataclass(frozen=True)
class ChannelTuning:
    """Launch shape of the per-channel key kernels (the bytes do not depend on it).

    ``head_major``: grid ``(head groups x channel chunks, blocks, L)``, so the programs of
    one key block's heads run side by side (else ``(blocks, ..., L)``);
    ``heads_per_program``: heads one program loops over (0: all; must divide the heads,
    else 1); ``channels``: channels per program (0: ``min(D, max(8, 8192 // key_block))``);
    ``num_warps``: 0 = 2 for the pack, 4 for the unpack; ``narrow``: the pack keeps a
    16-bit tile in the pool's dtype through the min/max and widens each element to float32
    only where it is quantised (fewer live registers a thread; the same bytes: min and
    max commute with the exact widening and with the fp16-range clamp);
    ``max_registers``: a cap on the registers a thread (ptxas ``.maxnreg``; 0: the
    compiler's choice; CUDA only). ncu put the default pack at 223 registers, 12.5 %
    occupancy (H100), but every cap of 64-168 spilled and packed slower on the H200
    (``bench/results/channel_kernel_register_caps_h200.md``: 1.38-2.07 against 1.35 ms
    at 16384 tokens), so the default leaves it to the compiler; ``fill_rows``: the rows
    after a key block's last token read that block's first token again (unmasked loads,
    and min/max without a select per element: repeats change neither; the stores stay
    masked), the same bytes with fewer instructions (sm_90, the default shape, Triton 3.6:
    2939 against 3315 SASS instructions a program of the INT8 tier, 23.0 against 25.9 an
    element, 229 PTX selects against 611; ``bench/results/channel_ptx_triton3.6.0.json``;
    H200, s17: 1.20 against 1.33 ms at 16384 tokens, b=0.3). ncu puts the pack at 60 %
    of the SMs' issue throughput and 45 % of DRAM's (H100): issue-bound, so instructions
    an element are what to cut.
    ``channel_group``: the pack loads its tile as ``[channels / g, rows, g]``, g adjacent
    channels a group (0: one group of all; 1: the channels along the tile's first axis;
    else it must divide ``channels`` and be even, or counts as 0). Which channels a
    thread holds is then Triton's layout heuristics' choice: under Triton 3.6 g=8 gives
    a thread 16 rows of 8 channels instead of 8 rows of 16, halving the work per channel
    a thread does (19.1 against 23.0 sm_90 SASS instructions an element with
    ``fill_rows``), but Triton 3.9 lays the same tile out otherwise and spills it (56.6);
    0 and 1 compile alike under both.
    ``words``: bf16 pools read as int32 words of channel pairs, quantised with the main
    pack's steps (``pack._store_quantized``: min/max two channels an instruction, the
    clamps of every element skipped when the block provably needs none, the floor as a
    full-rate add); implies ``fill_rows``' rows; other pools ignore it. With
    ``channel_group=1``: 13.8 instructions an element under Triton 3.6, 12.8 under 3.9,
    no spills (``bench/channel_ptx.py``; H200, s17: 0.98 against 1.33 ms). The same bytes.
    ``load_bytes``: with ``words``, the alignment (16, 8 or 4 bytes) the word loads are
    promised, which sets the bytes one load of a thread reads from a row and so a
    thread's share of the tile: 16 (the pools' real alignment) gives a thread 4 words of
    16 rows, 4 gives it one word (two channels) of all 64 rows. Promising less than the
    truth is always safe. With 4, a channel's scale, minimum and clamp margin are
    computed once (not once by each of 4 threads sharing it), and the min/max reductions
    need no shuffles; each row then costs a 4-byte load and its own address (sm_90,
    ``words`` with ``channel_group=1``: 11.7 against 13.8 SASS instructions an element
    under Triton 3.6, 10.8 against 12.8 under 3.9; ``bench/channel_ptx.py``; H200, s17:
    0.99 ms, and 0.96 with 32 channels). Other values count as 16; other pools ignore it.

    H200 sweep (``bench/results/channel_kernel.md``, 16384 tokens at b=0.3, Llama-3-8B
    KV, the whole ``pack_payload``): the default packs in 1.51 ms (0.44 of copy
    bandwidth) against 3.47 ms (0.19) for the block-major grid at 8 warps it replaced;
    the unpack 1.00 against 1.08 ms. ncu on the default pack: 254 registers a thread
    (the ``[64, 128]`` float32 tile), 12.5 % occupancy, 0.55 eligible warps per
    scheduler. More warps only add cross-warp reductions; a loop over heads serialises
    the loads; two passes of 16 rows (min/max, then codes) to free registers measured
    slower still (3.30 ms: ``bench/results/gpu_calls/2026-12-04-s4/two_pass_*``).
    :data:`DEFAULT_TUNING` since 2026-12-05 is 1 warp, 64 channels, ``narrow``: the best
    pack of the second sweep (``bench/results/gpu_calls/2026-12-05-s9/
    channel_kernel_narrow.md``: 1.30 ms, 0.52 of copy, against 1.59 ms for the fields'
    defaults in the same run; at 4096 tokens 0.41 against 0.45 ms), the same bytes.
    Since 2026-12-06 it is 32 channels, 1 warp, ``words`` with ``channel_group=1`` and
    ``load_bytes=4`` (the shape the pick chose from the third sweep,
    ``bench/results/gpu_calls/2026-12-06-s17/call1_channel_pack/``: the fastest pack of 17
    shapes at both lengths, 0.96 against 1.33 ms at 16384 tokens, 0.28 against 0.41 ms at
    4096, 0.69 and 0.63 of copy bandwidth; the unpack 0.93 against 0.99 ms). fp16 pools
    ignore ``words`` and take 32 channels with ``fill_rows``: the same bytes, not timed.
    """

    head_major: bool = True
    heads_per_program: int = 1
    channels: int = 0
    num_warps: int = 0
    narrow: bool = False
    max_registers: int = 0
    fill_rows: bool = False
    channel_group: int = 0
    words: bool = False
    load_bytes: int = 16

    @property
    def word_align(self) -> int:
        """The alignment promised to the word loads (``load_bytes``; else 16)."""
        return self.load_bytes if self.load_bytes in (4, 8) else 16


DEFAULT_TUNING = ChannelTuning(
    channels=32, num_warps=1, narrow=True, fill_rows=True, channel_group=1, words=True, load_bytes=4
)


@triton.jit
def _channel_program(
    meta,
    b1,
    n0,
    n1,
    num_layers,
    D: tl.constexpr,
    DC: tl.constexpr,
    KB: tl.constexpr,
    IDX: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
):
    """This program's place in a per-channel key launch (grid ``(blocks, H / HG * D / DC,
    L)``, the first two swapped when ``HEAD_MAJOR``): (head group, first channel ``c0``,
    channels ``c`` [DC], layer, then :func:`_channel_segment`'s fields)."""
    if HEAD_MAJOR:
        pid = tl.program_id(1)
        hc = tl.program_id(0)
    else:
        pid = tl.program_id(0)
        hc = tl.program_id(1)
    hg = hc // (D // DC)
    c0 = (hc % (D // DC)) * DC
    layer = tl.program_id(2)
    tier, blk, j, ok, first, n_seg, seg = _channel_segment(
        meta, pid, b1, n0, n1, num_layers, layer, 0, KB, IDX
    )
    return hg, c0, c0 + tl.arange(0, DC), layer, tier, blk, j, ok, first, n_seg, seg


@triton.jit
def _channel_segment(
    meta, pid, b1, n0, n1, num_layers, layer, kv, KB: tl.constexpr, IDX: tl.constexpr
):
    """Key block ``pid`` (INT8 blocks first, then INT4) of one layer's K|V segment:
    (tier, block, segment rows ``j`` [KB], ok [KB], list index of row 0, n_seg, seg)."""
    tier = 1 + (pid >= b1).to(tl.int32)
    blk = tl.where(tier == 1, pid, pid - b1).to(IDX)
    list0 = tl.where(tier == 1, n0, n0 + n1)
    e = _META_HEAD + (tier * num_layers + layer) * _META_STRIDE
    base = tl.load(meta + e)
    n_seg = tl.load(meta + e + 1)
    seg = tl.multiple_of(tl.load(meta + e + 2 + kv), 16)
    j = blk * KB + tl.arange(0, KB).to(IDX)
    return tier, blk, j, j < n_seg, list0 + base, n_seg, seg


@triton.jit
def _channel_tile(c0, DC: tl.constexpr, CW: tl.constexpr):
    """Channels ``[DC // CW, CW]`` of a program's tile, from ``c0``: groups of ``CW``
    adjacent channels (the tile is ``[DC // CW, rows, CW]``; see ``channel_group``)."""
    return c0 + tl.arange(0, DC // CW)[:, None] * CW + tl.arange(0, CW)[None, :]


@triton.jit
def _store_codes_and_scales(
    q,
    scale,
    mn,
    ok,
    payload,
    seg,
    n_seg,
    blk,
    j,
    h,
    c0,
    BITS: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    DC: tl.constexpr,
    KB: tl.constexpr,
    CW: tl.constexpr,
):
    """Store codes ``q`` (int32 ``[DC // CW, KB, CW]``, the code in the low bits) of the
    rows ``j`` that are ``ok`` and the (scale, minimum) fp16 pairs ``[DC // CW, CW]`` of
    the channels :func:`_channel_tile` of head ``h`` in key block ``blk``."""
    G: tl.constexpr = DC // CW
    codes = payload + seg
    row = (j * H + h)[None, :, None]
    ok3 = ok[None, :, None]
    if BITS == 8:  # the low byte: no mask
        tl.store(codes + row * D + _channel_tile(c0, DC, CW)[:, None, :], q.to(tl.uint8), mask=ok3)
    elif CW == 1:  # [DC, KB, 1]: the channel pairs along the first axis
        lo4, hi4 = tl.split(tl.permute(tl.reshape(q, [DC // 2, 2, KB]), (0, 2, 1)))
        half = (c0 // 2 + tl.arange(0, DC // 2))[:, None]
        tl.store(
            codes + (j * H + h)[None, :] * (D // 2) + half,
            ((hi4 << 4) + lo4).to(tl.uint8),
            mask=ok[None, :],
        )
    else:  # channel 2i in the low nibble, 2i+1 in the high one (the low byte of hi*16 + lo)
        lo4, hi4 = tl.split(tl.reshape(q, [G, KB, CW // 2, 2]))
        half = _channel_tile(c0 // 2, DC // 2, CW // 2)
        tl.store(
            codes + row * (D // 2) + half[:, None, :], ((hi4 << 4) + lo4).to(tl.uint8), mask=ok3
        )
    sc = (codes + n_seg * (H * D * BITS // 8)).to(tl.pointer_type(tl.float16), bitcast=True)
    pair = ((blk * H + h) * D + _channel_tile(c0, DC, CW))[:, :, None] * 2
    tl.store(sc + pair + tl.arange(0, 2)[None, None, :], tl.join(scale, mn))


@triton.jit
def _quantize_channels(x, ok, BITS: tl.constexpr, FILLED: tl.constexpr, PTX: tl.constexpr):
    """Codes (int32, the shape of ``x``), fp16 scales and minima ``[DC // CW, CW]`` of
    ``x`` ``[DC // CW, KB, CW]`` (float32, or the 16-bit pool values: widened exactly;
    the rows of a key block, channels :func:`_channel_tile`): one (scale, minimum) per
    channel over the rows that are ``ok`` (``codec.quantize_channels``: same float32
    steps; the codes biased as :func:`_quant.codes` gives them, every element clamped).
    ``FILLED``: rows past the valid ones repeat a valid row (``ChannelTuning.fill_rows``),
    so min and max read every row as it is."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    ok3 = ok[None, :, None]
    # min/max before the (monotonic) clamp and widening: the same values, x stays narrow
    if FILLED:
        lo_x = tl.min(x, 1).to(tl.float32)
        hi_x = tl.max(x, 1).to(tl.float32)
    else:
        lo_x = tl.min(tl.where(ok3, x, float("inf")), 1).to(tl.float32)
        hi_x = tl.max(tl.where(ok3, x, float("-inf")), 1).to(tl.float32)
    _, _, scale, mn, m, inv = group_quantiser(lo_x, hi_x, QMAX, True)
    q = codes(x.to(tl.float32), m[:, None, :], inv[:, None, :], QMAX, True, PTX)
    return q, scale, mn


@triton.jit
def _quantize_channel_words(
    w, BITS: tl.constexpr, DC: tl.constexpr, KB: tl.constexpr, CW: tl.constexpr, PTX: tl.constexpr
):
    """:func:`_quantize_channels` for bf16 pools read as int32 words ``w`` ``[DC // CW, KB,
    max(CW // 2, 1)]`` (channels 2i and 2i+1 of a group in word i; every row valid or a
    repeat of one: ``fill_rows``), with the main pack's steps (``pack._store_quantized``):
    min/max two channels an instruction (``PTX``: ``min.bf16x2``; else the even and odd
    halves), the clamps of every element skipped when the block provably needs none
    (``_quant.clamp_margin``), and with ``PTX`` the floor as a round-toward-zero add of
    2**23 (a full-rate FADD, not a conversion): the codes in the low bits. The same
    codes, scales and minima, in the same shapes. (The halves are joined back here,
    unlike the main pack's: stored straight from their own layout, the store's layout
    took over the whole tile and spilled, 30 SASS instructions an element at shape 33.)"""
    QMAX: tl.constexpr = (1 << BITS) - 1
    even, odd, lo_e, lo_o, hi_e, hi_o = bf16_words_range(w, 1, PTX)
    # [G, max(CW // 2, 1), 2]: channel 2i + k of a group at [., i, k] (CW == 1: [DC // 2,
    # 1, 2], channel 2g + k at [g, 0, k])
    lo_x = tl.join(lo_e, lo_o)
    hi_x = tl.join(hi_e, hi_o)
    x = tl.join(even, odd)  # [G, KB, max(CW // 2, 1), 2]
    lo, hi, scale, mn, m, inv = group_quantiser(lo_x, hi_x, QMAX)  # every row is valid
    margin = clamp_margin(lo_x, hi_x, lo, hi, m, inv, QMAX)
    m, inv = m[:, None, :, :], inv[:, None, :, :]
    if tl.min(tl.min(tl.min(margin, 2), 1), 0) < 0.0:
        q = codes(x, m, inv, QMAX, True, PTX)
    else:
        q = codes(x, m, inv, QMAX, False, PTX)
    if CW == 1:  # back to [DC, KB, 1] and [DC, 1]
        q = tl.reshape(tl.permute(q, (0, 3, 1, 2)), [DC, KB, 1])
        scale = tl.reshape(tl.permute(scale, (0, 2, 1)), [DC, 1])
        mn = tl.reshape(tl.permute(mn, (0, 2, 1)), [DC, 1])
    return (
        tl.reshape(q, [DC // CW, KB, CW]),
        tl.reshape(scale, [DC // CW, CW]),
        tl.reshape(mn, [DC // CW, CW]),
    )


@triton.jit
def _quantize_tile(
    t,
    ok,
    BITS: tl.constexpr,
    DC: tl.constexpr,
    KB: tl.constexpr,
    CW: tl.constexpr,
    FILLED: tl.constexpr,
    WORDS: tl.constexpr,
    PTX: tl.constexpr,
):
    """(codes, scales, minima) of a loaded tile ``t``: int32 words (``WORDS``,
    :func:`_quantize_channel_words`) or values (:func:`_quantize_channels`)."""
    if WORDS:
        q, scale, mn = _quantize_channel_words(t, BITS, DC, KB, CW, PTX)
    else:
        q, scale, mn = _quantize_channels(t, ok, BITS, FILLED, PTX)
    return q, scale, mn


@triton.jit(do_not_specialize=["b1", "n0", "n1", "h0"])
def _pack_channel_kernel(
    src_ptrs,  # int64 [2L]: K pools of layers 0..L-1, then V pools
    rows,  # int64 [N]: source row of each listed token
    meta,  # int64: plan table
    payload,  # uint8 [payload_nbytes]
    scales,  # float32 [2L]: FP8 scales (K of layer l at l; read when FP8)
    b1,  # key blocks of the INT8 tier (then those of INT4)
    n0,
    n1,  # tokens of FP16 and INT8
    num_layers,
    h0,  # first packed head of the pools
    SRC: tl.constexpr,
    H: tl.constexpr,  # packed heads
    HP: tl.constexpr,  # heads per pool slot
    D: tl.constexpr,
    DC: tl.constexpr,  # channels per program
    KB: tl.constexpr,  # rows per key scale block
    IDX: tl.constexpr,
    HG: tl.constexpr,  # heads per program
    HEAD_MAJOR: tl.constexpr,
    FP8: tl.constexpr = 0,  # uint8 pools of FP8 bits: 1 e4m3fn, 2 e5m2
    NARROW: tl.constexpr = False,  # keep the 16-bit tile (ChannelTuning.narrow)
    FILL: tl.constexpr = False,  # rows past the block's tokens repeat its first one
    CW: tl.constexpr = 0,  # channels a group of the tile (ChannelTuning.channel_group; 0: DC)
    WORDS: tl.constexpr = False,  # bf16 pools read as int32 words (ChannelTuning.words)
    PTX: tl.constexpr = False,  # compiled (not interpreted): inline PTX and libdevice
    WORD_ALIGN: tl.constexpr = 16,  # bytes the word loads are promised (load_bytes)
):
    """INT8/INT4 key segments with per-channel scales: one program per (key block,
    head group and channel chunk, layer); grid as :func:`_channel_program`'s."""
    hg, c0, _, layer, tier, blk, j, ok, first, n_seg, seg = _channel_program(
        meta, b1, n0, n1, num_layers, D, DC, KB, IDX, HEAD_MAJOR
    )
    GW: tl.constexpr = CW if CW > 0 else DC
    if blk * KB < n_seg:
        slot = tl.load(rows + first + j, mask=ok, other=0)
        if FILL or WORDS:  # the block's first token stands in for the rows past its last
            slot = tl.where(ok, slot, tl.load(rows + first + blk * KB))
        addr = tl.multiple_of(tl.load(src_ptrs + layer), 16)
        pool = tl.multiple_of(addr.to(tl.pointer_type(SRC)), 16)
        words = tl.multiple_of(addr.to(tl.pointer_type(tl.int32)), WORD_ALIGN)
        WG: tl.constexpr = GW // 2 if GW > 1 else 1  # words a group (the WORDS tile)
        word_tile = _channel_tile(c0 // 2, DC // 2, WG)
        for i in tl.static_range(HG):
            h = hg * HG + i
            off = (slot * HP + h0 + h) * D
            if WORDS:  # int32 words of bf16 pairs
                t = tl.load(words + (off // 2)[None, :, None] + word_tile[:, None, :])
            else:
                src = pool + off[None, :, None] + _channel_tile(c0, DC, GW)[:, None, :]
                if FILL:
                    t = tl.load(src)
                else:
                    t = tl.load(src, mask=ok[None, :, None], other=0.0)
                if FP8:
                    t = from_fp8(t, FP8) * tl.load(scales + layer)
                elif not NARROW:
                    t = t.to(tl.float32)
            if tier == 1:
                q, scale, mn = _quantize_tile(t, ok, 8, DC, KB, GW, FILL, WORDS, PTX)
                _store_codes_and_scales(
                    q, scale, mn, ok, payload, seg, n_seg, blk, j, h, c0, 8, H, D, DC, KB, GW
                )
            else:
                q, scale, mn = _quantize_tile(t, ok, 4, DC, KB, GW, FILL, WORDS, PTX)
                _store_codes_and_scales(
                    q, scale, mn, ok, payload, seg, n_seg, blk, j, h, c0, 4, H, D, DC, KB, GW
                )


def channel_grid(plan: TransferPlan, tuning: ChannelTuning = DEFAULT_TUNING) -> tuple[int, ...]:
    """(INT8 key blocks, INT8 + INT4 key blocks, channels per program, heads per program)
    of the per-channel key kernels (upper bounds: a sliding-window layer has fewer)."""
    lay = plan.layout
    kb, d, h = lay.key_block, lay.head_dim, lay.num_kv_heads
    b1 = -(-plan.counts[1] // kb)
    b2 = b1 + -(-plan.counts[2] // kb)
    dc = tuning.channels or min(d, max(8, 8192 // kb))
    if dc > d or d % dc or dc % 2:
        dc = min(d, max(8, 8192 // kb))
    hg = tuning.heads_per_program or h
    return b1, b2, dc, hg if h % hg == 0 else 1


def channel_launch(
    plan: TransferPlan,
    device: torch.device,
    place: tuple[int, int],
    tuning: ChannelTuning = DEFAULT_TUNING,
    warps: int = 2,
) -> tuple[tuple, tuple, dict] | None:
    """Grid, trailing arguments ``(b1, n0, n1, num_layers, h0)`` and the launch options
    shared by the per-channel key kernels, for heads ``place = (h0, HP)`` (``h0 ..`` of
    pools of ``HP`` heads per slot; ``warps``: when ``tuning`` names none); None when
    there are no INT8/INT4 key blocks."""
    lay = plan.layout
    b1, b2, dc, hg = channel_grid(plan, tuning)
    if not b2:
        return None
    n_rows = (sum(plan.counts) + lay.key_block) * lay.num_kv_heads
    groups = lay.num_kv_heads // hg * (lay.head_dim // dc)
    grid = (groups, b2) if tuning.head_major else (b2, groups)
    args = (b1, plan.counts[0], plan.counts[1], lay.num_layers, place[0])
    options = {
        "H": lay.num_kv_heads,
        "HP": place[1],
        "D": lay.head_dim,
        "DC": dc,
        "KB": lay.key_block,
        "IDX": tl.int64 if n_rows * lay.head_dim >= 2**31 else tl.int32,
        "HG": hg,
        "HEAD_MAJOR": tuning.head_major,
        "num_warps": tuning.num_warps or warps,
        **launch_options(device),
    }
    if tuning.max_registers and device.type == "cuda":
        options["maxnreg"] = tuning.max_registers
    return (*grid, lay.num_layers), args, options


def launch_pack_channel(
    plan: TransferPlan, ptrs, rows, payload, dtype, place, tuning: ChannelTuning = DEFAULT_TUNING
) -> None:
    """Pack the INT8/INT4 key segments of a layout with per-channel key scales (heads
    ``place``, see :func:`channel_launch`; ``tuning``: the launch shape)."""
    args = (dtype, place, tuning, payload.device)  # every later group of a chunk: the same
    launch = plan.launch(("pack_channel", *args), lambda: _pack_channel_spec(plan, *args))
    if launch is not None:
        launch(ptrs, rows, payload)


def _pack_channel_spec(
    plan: TransferPlan, dtype, place, tuning: ChannelTuning, device: torch.device
) -> Launch | None:
    """The :class:`Launch` of :func:`launch_pack_channel` (given: pool pointers, rows,
    payload); None without INT key blocks."""
    launch = channel_launch(plan, device, place, tuning)
    if launch is None:
        return None
    grid, args, options = launch
    scales, fp8 = source_args(plan.layout, dtype, device)
    group = tuning.channel_group
    if group != 1 and (group <= 0 or options["DC"] % group or group % 2):
        group = 0  # one group of all the program's channels
    options.update(
        SRC=TL_DTYPES[dtype],
        FP8=fp8,
        NARROW=tuning.narrow and dtype in (torch.bfloat16, torch.float16),
        FILL=tuning.fill_rows,
        CW=group,
        WORDS=tuning.words and bf16_words(dtype, device, _pack_channel_kernel),
        PTX=not interpreted(_pack_channel_kernel),
        WORD_ALIGN=tuning.word_align,
    )
    return Launch(_pack_channel_kernel, grid, (None, None, plan.meta, None, scales, *args), options)


@triton.jit(do_not_specialize=["b1", "n0", "n1", "h0"])
def _unpack_channel_kernel(
    payload,  # uint8 [payload_nbytes]
    dst_ptrs,  # int64 [2L]: K pools of layers 0..L-1, then V pools
    rows,  # int64 [N]: destination row of each listed token
    meta,  # int64: plan table
    dst_scales,  # float32 [2L]: FP8 destination pools' scales (K of layer l at l)
    b1,  # key blocks of the INT8 tier (then those of INT4)
    n0,
    n1,
    num_layers,
    h0,  # first written head of the pools
    DST: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    D: tl.constexpr,
    DC: tl.constexpr,
    KB: tl.constexpr,
    IDX: tl.constexpr,
    HG: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    DFP8: tl.constexpr = 0,
    DDIV: tl.constexpr = False,
):
    """Mirror of ``pack._pack_channel_kernel``: dequantise per-channel-scaled key rows
    (``codec.dequantize_channels``: ``q * scale + minimum`` in float32) into the pools."""
    hg, c0, c, layer, tier, blk, j, ok, first, n_seg, seg = _channel_program(
        meta, b1, n0, n1, num_layers, D, DC, KB, IDX, HEAD_MAJOR
    )
    if blk * KB < n_seg:
        codes = payload + seg
        slot = tl.load(rows + first + j, mask=ok, other=0)
        addr = tl.multiple_of(tl.load(dst_ptrs + layer), 16)
        pool = tl.multiple_of(addr.to(tl.pointer_type(DST)), 16)
        sd = tl.load(dst_scales + layer)
        for i in tl.static_range(HG):
            h = hg * HG + i
            row = j * H + h
            if tier == 1:
                q = tl.load(codes + row[:, None] * D + c[None, :], mask=ok[:, None], other=0)
                sc = (codes + n_seg * (H * D)).to(tl.pointer_type(tl.float16), bitcast=True)
            else:
                half = c0 // 2 + tl.arange(0, DC // 2)
                b = tl.load(
                    codes + row[:, None] * (D // 2) + half[None, :], mask=ok[:, None], other=0
                )
                q = tl.reshape(tl.join(b & 15, b >> 4), [KB, DC])
                sc = (codes + n_seg * (H * D // 2)).to(tl.pointer_type(tl.float16), bitcast=True)
            pair = ((blk * H + h) * D + c)[:, None] * 2 + tl.arange(0, 2)[None, :]
            s, m = tl.split(tl.load(sc + pair).to(tl.float32))
            x = q.to(tl.float32) * s[None, :] + m[None, :]
            off = (slot * HP + h0 + h) * D
            x = to_pool(x, sd, DST, SOFT_BF16, DFP8, DDIV)
            tl.store(pool + off[:, None] + c[None, :], x, mask=ok[:, None])


def launch_unpack_channel(
    plan: TransferPlan,
    payload,
    ptrs,
    rows,
    dtype,
    place,
    fp8=None,
    tuning: ChannelTuning = DEFAULT_TUNING,
) -> None:
    """Unpack the INT8/INT4 key segments of a layout with per-channel key scales into heads
    ``place`` (see :func:`channel_launch`) of pools of ``dtype`` (uint8: FP8, ``fp8``)."""
    launch = channel_launch(plan, payload.device, place, tuning, warps=4)
    if launch is None:
        return
    grid, args, options = launch
    dst_scales, dfp8, ddiv = dest_args(fp8, plan.layout.num_layers, payload.device)
    _unpack_channel_kernel[grid](
        payload,
        ptrs,
        rows,
        plan.meta,
        dst_scales,
        *args,
        DST=TL_DTYPES[dtype],
        SOFT_BF16=interpreted(_unpack_channel_kernel) and dtype == torch.bfloat16,
        DFP8=dfp8,
        DDIV=ddiv,
        **options,
    )
