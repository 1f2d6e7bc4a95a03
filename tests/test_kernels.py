"""Triton pack/unpack kernels against the torch codec (the reference of every byte).

Without CUDA the kernels run in Triton's CPU interpreter on small shapes: the
kernel modules are imported with ``TRITON_INTERPRET=1`` set (``triton.jit``
decides at decoration time) and the variable is restored right after; an
autouse fixture sets it again only while this module's tests run, so no other
test module sees it. Tests marked ``gpu`` run the compiled kernels on
realistic shapes and skip cleanly without CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import CUDA, import_kernels, paged_slots, same_bits

from sglang_spectrum.codec import (
    PACKED_TIERS,
    KVLayout,
    decode_kv,
    pack_tiers,
    payload_checksum,
    read_header,
    segment_offsets,
    unpack_kv,
)
from sglang_spectrum.config import SpectrumConfigError, SpectrumFormatError
from sglang_spectrum.fp8 import FP8Pool, is_fp8, quantize_fp8
from sglang_spectrum.policy import Tier
from sglang_spectrum.quant import quantize, quantize_channels
from sglang_spectrum.scoring import key_norm_scores

K = import_kernels()
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """Interpreted kernels also read TRITON_INTERPRET while they run: set it for
    this module's tests only (monkeypatch restores it after each test)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@dataclass
class Request:
    layout: KVLayout
    tiers: torch.Tensor  # uint8 [T], CPU
    slots: torch.Tensor  # int64 [T], on the pools' device
    k_pools: list[torch.Tensor]
    v_pools: list[torch.Tensor]
    fp8: FP8Pool | None = None  # FP8 source: the pools hold uint8 FP8 bits

    def gathered(self):
        firsts = self.layout.layer_first_pos
        keys = [k[self.slots[f:]] for k, f in zip(self.k_pools, firsts)]
        values = [v[self.slots[f:]] for v, f in zip(self.v_pools, firsts)]
        return keys, values

    def empty_pools(self, fill=float("nan"), fp8: FP8Pool | None = None, dtype=None):
        """Pools shaped like the source's filled with ``fill``: of the source's format, or
        FP8 pools described by ``fp8``, or of ``dtype``."""
        fp8 = self.fp8 if fp8 is None and dtype is None else fp8
        shape, device = self.k_pools[0].shape, self.k_pools[0].device
        if fp8 is not None:  # NaN: 0x7F in both formats
            byte = int(quantize_fp8(torch.tensor([fill]), fp8.dtype)) if fill == fill else 0x7F
            make = lambda: torch.full(shape, byte, dtype=torch.uint8, device=device)  # noqa: E731
        else:
            dt = dtype or self.k_pools[0].dtype
            make = lambda: torch.full(shape, fill, dtype=dt, device=device)  # noqa: E731
        layers = len(self.k_pools)
        return [make() for _ in range(layers)], [make() for _ in range(layers)]


def stored(rows: torch.Tensor, pool: torch.Tensor, fp8: FP8Pool | None, layer: int, key: bool):
    """Real float32 ``rows`` as a pool like ``pool`` stores them (FP8: its bits)."""
    if fp8 is not None:
        return quantize_fp8(rows.cpu(), fp8.dtype, fp8.scale(layer, key)).to(pool.device)
    return rows.to(pool.device, pool.dtype)


def untouched(rows: torch.Tensor, fp8: FP8Pool | None) -> bool:
    """Rows of a NaN-filled pool are all still NaN."""
    return bool((rows == 0x7F).all() if fp8 is not None else torch.isnan(rows.float()).all())


def gpu_request(tokens: int, **kw: object) -> Request:
    """The GPU tests' request: 4 layers x 8 KV heads x 128 on CUDA, seeded by ``tokens``."""
    return make_request("cuda", layers=4, heads=8, head_dim=128, tokens=tokens, seed=tokens, **kw)


def make_request(
    device=DEV,
    *,
    layers=2,
    heads=2,
    head_dim=64,
    tokens=37,
    page=16,
    dtype=torch.bfloat16,
    group=None,
    window=True,
    rotation="none",
    tiers=None,
    seed=0,
    key_block=0,
) -> Request:
    """Random request in paged pools: pages of ``page`` slots, shuffled, with spare
    pages; KV with per-channel scales and a few outliers; last layer a sliding window.
    FP8 ``dtype``: uint8 pools of FP8 bits with per-layer scales other than 1.0."""
    gen = torch.Generator().manual_seed(seed)
    slots, num_slots = paged_slots(tokens, page, 3, gen)
    fp8 = None
    if is_fp8(dtype):
        k_scales = [0.5 * (layer + 1) for layer in range(layers)]
        fp8 = FP8Pool.of(dtype, layers, k_scales, [0.25] + [1.0] * (layers - 1))

    def pool(scale, layer=0, key=True):
        chan = torch.exp(torch.randn(heads, head_dim, generator=gen))
        x = torch.randn(num_slots, heads, head_dim, generator=gen) * chan * scale
        x[torch.rand(x.shape, generator=gen) < 1e-3] *= 30.0
        if fp8 is not None:
            return quantize_fp8(x, fp8.dtype, fp8.scale(layer, key)).to(device)
        return x.to(dtype).to(device)

    first = [0] * layers
    if window and layers > 1:
        first[-1] = tokens // 3
    layout = KVLayout(
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        dtype=str(dtype).removeprefix("torch."),
        group_size=group or head_dim,
        num_tokens=tokens,
        layer_first_pos=first,
        rotation=rotation,
        key_block=key_block,
        kv_scales=fp8.scales if fp8 is not None else [],
    )
    if tiers is None:
        tiers = torch.randint(0, 4, (tokens,), generator=gen, dtype=torch.uint8)
        tiers[0] = int(Tier.FP16)
    return Request(
        layout,
        tiers,
        slots.to(device),
        [pool(2.0, layer, True) for layer in range(layers)],
        [pool(1.0, layer, False) for layer in range(layers)],
        fp8,
    )


def int_segments(layout: KVLayout, tiers: torch.Tensor):
    """(tier index 1|2, start, code bytes, segment bytes) of every non-empty INT8/INT4
    segment of a payload, in payload order."""
    base, offsets, _ = K.segment_table(layout, tiers)
    held = (base[:, -1:] - base[:, :-1]).tolist()
    i = 0
    for k, tier in enumerate(PACKED_TIERS):
        for n in held[k]:
            for kv in range(2):
                start, size = offsets[i], layout.seg_nbytes(tier, n, key=kv == 0)
                i += 1
                if tier == Tier.FP16 or not n:
                    continue
                codes = n * layout.num_kv_heads * layout.head_dim * (8 if k == 1 else 4) // 8
                yield k, start, codes, size


def code_diff(ref: torch.Tensor, got: torch.Tensor, layout: KVLayout, tiers: torch.Tensor):
    """Compare two payloads segment by segment.

    Returns (differing code bytes, largest code difference in LSB, differing
    scale words, largest scale difference in fp16 ulps, other differing bytes).
    """
    ref, got = ref.cpu(), got.cpu()
    code_bytes = lsb = scale_words = ulps = 0
    covered = torch.zeros(ref.numel(), dtype=torch.bool)
    for k, start, codes, size in int_segments(layout, tiers):
        a, b = ref[start : start + codes].int(), got[start : start + codes].int()
        if k == 2:
            a, b = torch.cat([a & 15, a >> 4]), torch.cat([b & 15, b >> 4])
        code_bytes += int((ref[start : start + codes] != got[start : start + codes]).sum())
        lsb = max(lsb, int((a - b).abs().max()))
        sa = ref[start + codes : start + size].view(torch.int16).int()
        sb = got[start + codes : start + size].view(torch.int16).int()
        scale_words += int((sa != sb).sum())
        ulps = max(ulps, int((sa - sb).abs().max()))
        covered[start : start + size] = True
    other = int(((ref != got) & ~covered).sum())
    return code_bytes, lsb, scale_words, ulps, other


def negative_zero_words(payload: torch.Tensor, layout: KVLayout, tiers: torch.Tensor) -> int:
    """Scale and minimum words of the INT segments that are -0.0 (the format stores +0.0)."""
    payload = payload.cpu()
    return sum(
        int((payload[start + codes : start + size].view(torch.int16) == -32768).sum())
        for _, start, codes, size in int_segments(layout, tiers)
    )


def check_request(req: Request, mode: str = "same") -> dict:
    """Pack with the kernel and the reference, unpack both ways; return diff stats.

    ``mode``: ``"same"``: byte-identical to ``pack_tiers`` on the pools' device;
    ``"cpu"``: byte-identical to ``pack_tiers`` on CPU (the format's exact
    arithmetic) and within the bound below of the reference on the pools'
    device; ``"bound"``: within the bound only (codes 1 LSB, scale words 1 fp16
    ulp, FP16 rows and padding exact, few differing bytes). Stats compare with
    the reference on the pools' device.
    """
    keys, values = req.gathered()
    ref = pack_tiers(keys, values, req.layout, req.tiers, policy="t")
    got = K.pack_from_pools(req.k_pools, req.v_pools, req.slots, req.layout, req.tiers, policy="t")
    assert got.header.offsets == ref.header.offsets == segment_offsets(req.layout, req.tiers)[0]
    stats = dict(
        zip(
            ("code_bytes", "max_lsb", "scale_words", "max_ulp", "other"),
            code_diff(ref.payload, got.payload, req.layout, req.tiers),
        )
    )
    stats["payload_bytes"] = ref.payload.numel()
    if mode != "same":
        assert stats["other"] == 0 and stats["max_lsb"] <= 1 and stats["max_ulp"] <= 1, stats
        assert stats["code_bytes"] <= max(2, 1e-3 * stats["payload_bytes"]), stats
    if mode == "cpu":
        ref = pack_tiers(
            [k.cpu() for k in keys], [v.cpu() for v in values], req.layout, req.tiers, policy="t"
        )
    strict = mode != "bound"
    if strict:
        assert torch.equal(ref.payload.cpu(), got.payload.cpu()), stats
        assert ref.header_bytes == got.header_bytes
    # Kernel-packed buffer through the reference reader, reference buffer through the kernel.
    device = req.slots.device
    buf_ref, buf_got = ref.to_tensor(device), got.to_tensor()
    rk, rv = req.empty_pools()
    unpack_kv(buf_got, rk, rv, req.slots, fp8=req.fp8)
    kk, kv = req.empty_pools()
    info = K.unpack_to_pools(buf_ref, kk, kv, req.slots, fp8=req.fp8)
    assert info.tier_counts == ref.tier_counts
    dk, dv, kept = decode_kv(buf_ref)
    dropped = ~kept.to(device)
    for layer, first in enumerate(req.layout.layer_first_pos):
        slots = req.slots[first:]
        for pools, dec, key in ((kk, dk, True), (kv, dv, False)):
            out = pools[layer][slots]
            ref_rows = stored(dec[layer], out, req.fp8, layer, key)
            live = ~dropped[first:]
            if strict:
                assert same_bits(out[live], ref_rows[live])
            else:
                tol = 2.0 * float(ref_rows.float().abs().max()) / 15 + 1e-3
                assert float((out[live].float() - ref_rows[live].float()).abs().max()) <= tol
            assert untouched(out[~live], req.fp8), "dropped slots must stay untouched"
        if strict:
            assert same_bits(rk[layer], kk[layer]) and same_bits(rv[layer], kv[layer])
    return stats


# --------------------------------------------------------------------------- CPU / interpreter

CPU_CASES = [
    dict(dtype=torch.bfloat16, head_dim=64, group=64, page=1),
    dict(dtype=torch.bfloat16, head_dim=128, group=32, page=16),
    dict(dtype=torch.float16, head_dim=64, group=16, page=64),
    dict(dtype=torch.float16, head_dim=256, group=256, page=16, tokens=19),
    dict(dtype=torch.float32, head_dim=64, group=32, page=1),
    dict(dtype=torch.bfloat16, head_dim=64, group=64, page=16, heads=3, layers=3),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_pack_unpack_byte_identical(case):
    check_request(make_request("cpu", **case))


CHANNEL_CASES = [
    dict(dtype=torch.bfloat16, head_dim=64, group=64, page=16, key_block=16, tokens=70),
    dict(dtype=torch.float16, head_dim=32, group=16, page=1, key_block=8, tokens=45),
    dict(dtype=torch.float32, head_dim=16, group=16, page=16, key_block=4, tokens=30, heads=3),
    dict(dtype=torch.bfloat16, head_dim=16, group=8, page=4, key_block=64, tokens=150, layers=3),
]


@pytest.mark.parametrize("case", CHANNEL_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_channel_keys_byte_identical(case):
    """Per-channel key scales (KIVI blocks, partial last blocks, a sliding-window
    layer): the kernels write and read the reference's bytes."""
    req = make_request("cpu", **case)
    assert K.kernel_supported(req.layout)
    check_request(req)


TUNINGS = [
    dict(head_major=False, num_warps=8),
    dict(heads_per_program=0),
    dict(head_major=True, heads_per_program=0, num_warps=2),
    dict(channels=8, heads_per_program=3),  # 3 does not divide 2 heads: one per program
    dict(narrow=True, num_warps=1),
    dict(narrow=True, num_warps=2, max_registers=96),  # a register cap (CUDA only)
    dict(narrow=True, num_warps=1, channels=8, fill_rows=True),
    dict(fill_rows=True),  # the float32 tile
    dict(narrow=True, num_warps=1, channel_group=4),  # two groups of the 8 channels
    dict(narrow=True, num_warps=1, channel_group=2, fill_rows=True),
    dict(channels=8, channel_group=2, heads_per_program=0),
    dict(channel_group=3),  # does not divide the channels: one group
    dict(words=True),  # bf16 words: the main pack's quantiser steps
    dict(words=True, narrow=True, num_warps=1, channel_group=4),
    dict(words=True, channels=8, channel_group=2, num_warps=2),
    dict(words=True, channel_group=1),  # channel pairs along the tile's first axis
    dict(narrow=True, num_warps=1, channel_group=1),
    dict(words=True, channel_group=1, load_bytes=4),  # a thread a word of every row
    dict(words=True, channel_group=1, load_bytes=8, num_warps=2),
    dict(words=True, load_bytes=5),  # not 4 or 8: counts as 16
]


@pytest.mark.parametrize("tuning", TUNINGS, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
def test_channel_launch_shapes_write_the_same_bytes(tuning):
    """Every launch shape of the per-channel key kernels packs the default's bytes and
    unpacks them into the same pools (the shape is a speed knob, never a format one)."""
    req = make_request(dtype=torch.bfloat16, head_dim=16, group=8, page=4, key_block=8, tokens=90)
    plan = K.plan_transfer(req.layout, req.tiers.to(req.slots.device), req.slots)
    shape = K.ChannelTuning(**tuning)
    default = K.pack_payload(req.k_pools, req.v_pools, plan)
    tuned = K.pack_payload(req.k_pools, req.v_pools, plan, channel_tuning=shape)
    assert torch.equal(default, tuned)
    pools = [req.empty_pools(), req.empty_pools()]
    K.unpack_payload(default, *pools[0], plan)
    K.unpack_payload(default, *pools[1], plan, channel_tuning=shape)
    for a, b in zip(pools[0][0] + pools[0][1], pools[1][0] + pools[1][1]):
        assert same_bits(a, b)


def test_channel_words_take_the_clamped_path_where_a_block_needs_it():
    """``ChannelTuning(words=True)`` skips every element's clamps only where a block's
    extremes prove them idle: blocks beyond the fp16 range, constant and tiny ones in one
    request still pack the reference's bytes."""
    req = make_request(dtype=torch.bfloat16, head_dim=16, group=8, page=4, key_block=8, tokens=48)
    for i, p in enumerate(req.k_pools):
        p[req.slots[:8]] = 3.0  # a constant block: scale 0
        p[req.slots[8:16], 0, :4] = 1e6 * (i + 1)  # beyond the fp16 range
        p[req.slots[16:24], 1, 2] = -7e4  # one channel below it
        p[req.slots[24:32]] *= 1e-6
    req.tiers[:32] = torch.tensor([1, 2] * 16, dtype=torch.uint8)
    check_request(req)  # the default launch: the reference's bytes
    plan = K.plan_transfer(req.layout, req.tiers.to(req.slots.device), req.slots)
    default = K.pack_payload(req.k_pools, req.v_pools, plan)
    shapes = [K.ChannelTuning(words=True, channel_group=g) for g in (0, 1, 4)]
    shapes.append(K.ChannelTuning(words=True, channel_group=1, load_bytes=4))
    for shape in shapes + [K.ChannelTuning(channel_group=1)]:
        assert torch.equal(
            K.pack_payload(req.k_pools, req.v_pools, plan, channel_tuning=shape), default
        )


def test_channel_keys_edge_values():
    req = make_request("cpu", dtype=torch.float32, head_dim=16, group=16, tokens=40, key_block=8)
    for i, p in enumerate(req.k_pools):
        p[req.slots[:8]] = 3.0  # a constant block: scale 0
        p[req.slots[8:16], 0, :4] = 1e6 * (i + 1)  # beyond the fp16 range
        p[req.slots[16:24]] *= 1e-6
    req.tiers[:24] = torch.tensor([1, 2] * 12, dtype=torch.uint8)
    check_request(req)


def test_channel_keys_hadamard_within_one_lsb():
    req = make_request("cpu", head_dim=16, group=8, tokens=40, key_block=8, rotation="hadamard")
    check_request(req, mode="bound")


def test_hadamard_within_one_lsb():
    stats = check_request(make_request("cpu", group=32, rotation="hadamard"), mode="bound")
    print("hadamard diff (interpreter):", stats)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_quantiser_edge_values(dtype):
    """Values beyond the fp16 range (clamped), constant groups (scale 0), tiny and
    huge spreads, negative-only groups: still byte-identical."""
    req = make_request("cpu", dtype=dtype, group=16, tokens=24, seed=3)
    big = 1e6 if dtype != torch.float16 else 6e4
    for pools in (req.k_pools, req.v_pools):
        for i, p in enumerate(pools):
            rows = req.slots
            p[rows[0]] = 3.0  # constant rows: scale 0
            p[rows[1], :, :16] = -big
            p[rows[2]] = p[rows[2]] * (big if dtype != torch.float16 else 1e3)  # > fp16 range
            p[rows[3]] = p[rows[3]] * 1e-6  # tiny spread
            p[rows[4]] = -p[rows[4]].abs() - 7e4 if dtype != torch.float16 else -p[rows[4]].abs()
            p[rows[5], 0, 0] = big * (i + 1)
    req.tiers[:8] = torch.tensor([1, 2, 1, 2, 1, 2, 1, 2], dtype=torch.uint8)
    check_request(req)


def signed_zero_rows(req: Request, fp8: bool = False, block: int = 8) -> None:
    """Rows ``0 .. 2 * block - 1`` of ``req`` INT8 (so, with ``key_block == block``, two
    whole key blocks), then 4 INT4 rows: first only zeros (+0.0 and -0.0 alternating in
    both orders, all -0.0, all +0.0), then non-negative rows whose minimum is a zero of
    either sign. Which zero a min/max returns is up to the implementation (torch keeps
    the first, the interpreter's numpy the last, the GPU its own)."""
    pos, neg = (0x00, 0x80) if fp8 else (0.0, -0.0)
    n = 2 * block
    for pools in (req.k_pools, req.v_pools):
        for p in pools:
            rows, d = req.slots, p.shape[-1]
            p[rows[:n]] = p[rows[:n]] & 0x7F if fp8 else p[rows[:n]].abs()
            for r in range(block):  # block 0: zeros only
                first, second = (pos, neg, neg, pos)[r % 4], (neg, pos, neg, pos)[r % 4]
                p[rows[r], :, 0::2], p[rows[r], :, 1::2] = first, second
            p[rows[block]], p[rows[block + 1]] = neg, pos  # block 1: minimum a zero
            p[rows[block + 2], :, : d // 2] = neg
            p[rows[block + 3], :, d // 2 :] = pos
    req.tiers[:n] = int(Tier.INT8)
    req.tiers[n : n + 4] = int(Tier.INT4)


@pytest.mark.parametrize("key_block", [0, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_signed_zeros_store_plus_zero_words(dtype, key_block):
    """Groups and channel blocks of signed zeros (and non-negative ones whose minimum is
    a zero): the kernels write the reference's bytes, every zero scale or minimum word
    +0.0 (the GPU's min/max picked another zero than torch's: 32768 ulp)."""
    req = make_request("cpu", dtype=dtype, head_dim=16, group=8, tokens=40, key_block=key_block)
    signed_zero_rows(req)
    keys, values = req.gathered()
    ref = pack_tiers(keys, values, req.layout, req.tiers, policy="t")
    assert negative_zero_words(ref.payload, req.layout, req.tiers) == 0
    check_request(req)


def test_reference_quantisers_store_plus_zero():
    x = torch.tensor(
        [[0.0, -0.0, 1.0, 2.0], [-0.0, 0.0, 0.0, -0.0], [-0.0] * 4, [-0.0, 3.0, 0.0, 5.0]]
    )
    for bits in (8, 4):
        _, scales = quantize(x.reshape(4, 1, 4), bits, 4)
        assert not bool(torch.signbit(scales).any())
        _, scales = quantize_channels(x.reshape(4, 1, 4), bits, 4)
        assert not bool(torch.signbit(scales).any())
        _, scales = quantize_channels(x.T.reshape(4, 1, 4), bits, 3)  # partial last block
        assert not bool(torch.signbit(scales).any())


def test_segment_table_matches_reference():
    for seed in range(5):
        req = make_request("cpu", layers=4, tokens=50, seed=seed)
        lay = req.layout.__class__(**{**_fields(req.layout), "layer_first_pos": [0, 5, 49, 50]})
        assert K.segment_table(lay, req.tiers)[1:] == segment_offsets(lay, req.tiers)


def _fields(layout):
    return {f: getattr(layout, f) for f in layout.__struct_fields__}


# block rows: 1 (+ a tail), 3, 64 (the most the host adds up) and 65 + a tail (device sum)
@pytest.mark.parametrize(
    "nbytes", [0, 1, 3, 4, 64, 4 * 8192 + 7, 3 * 4 * 8192 + 64, 64 * 4 * 8192, 65 * 4 * 8192 + 20]
)
def test_fast_checksum_matches_reference(nbytes):
    data = torch.randint(
        0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes)
    ).to(DEV)  # (Triton's interpreter on CPU, the compiled kernel on CUDA)
    parts = K.checksum_parts(data)
    words = -(-nbytes // 4)
    rows = -(-(words // 16 * 16) // 8192) + (words % 16 > 0)
    assert parts.numel() == (2 * rows if 0 < rows <= 64 else 2)
    assert K.fast_checksum(data) == payload_checksum(data)


def test_edge_cases_all_dropped_single_token_and_fallback():
    req = make_request("cpu", tokens=5, tiers=torch.full((5,), int(Tier.DROP), dtype=torch.uint8))
    check_request(req)
    check_request(make_request("cpu", tokens=1, layers=1))
    odd = make_request("cpu", head_dim=6, group=2, tokens=9)  # not kernel-supported: reference
    assert not K.kernel_supported(odd.layout)
    check_request(odd)
    kivi = make_request("cpu", tokens=100, key_block=64, head_dim=16)  # per-channel keys
    assert K.kernel_supported(kivi.layout)
    check_request(kivi)
    odd_block = make_request("cpu", tokens=20, key_block=6, head_dim=16)  # not a power of two
    assert not K.kernel_supported(odd_block.layout)
    check_request(odd_block)


def test_unpack_rejects_bad_input_and_writes_nothing():
    req = make_request("cpu")
    keys, values = req.gathered()
    good = pack_tiers(keys, values, req.layout, req.tiers).to_tensor()
    bad = good.clone()
    bad[-1] ^= 0x40  # payload corruption: checksum
    short = good[:-8]
    for buf, slots in (
        (bad, req.slots),
        (short, req.slots),
        (good, req.slots[:-1]),
        (good[:10], req.slots),
    ):
        kk, kv = req.empty_pools(1.0)
        with pytest.raises(SpectrumFormatError):
            K.unpack_to_pools(buf, kk, kv, slots)
        assert all(bool((p == 1.0).all()) for p in kk + kv)
    with pytest.raises(SpectrumConfigError):  # layout / pool dtype mismatch on pack
        K.pack_from_pools(
            [p.half() for p in req.k_pools],
            [p.half() for p in req.v_pools],
            req.slots,
            req.layout,
            req.tiers,
        )


def test_plan_reuse_and_tables():
    req = make_request("cpu", tokens=40)
    plan = K.plan_transfer(req.layout, req.tiers, req.slots)
    n = torch.bincount(req.tiers.long(), minlength=4)
    assert plan.counts == tuple(int(c) for c in n[:3])
    assert plan.payload_nbytes == segment_offsets(req.layout, req.tiers)[1]
    a = K.pack_payload(req.k_pools, req.v_pools, plan)
    b = K.pack_from_pools(req.k_pools, req.v_pools, req.slots, req.layout, req.tiers, plan=plan)
    assert torch.equal(a, b.payload)


def test_key_norm_scores_from_pools():
    req = make_request("cpu", layers=3, tokens=40)
    keys, _ = req.gathered()
    ref = key_norm_scores(keys, req.layout.num_tokens)
    got = K.key_norm_scores_from_pools(req.k_pools, req.slots, req.layout.layer_first_pos)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 2.0 / 40 + 1e-6  # at most a swap of neighbours
    assert float((got == ref).float().mean()) > 0.9


def check_head_range(req: Request, src: tuple[int, int], dst_heads: int, dst: tuple[int, int]):
    """Heads ``src`` of ``req``'s pools packed in place (``heads=src``): the bytes of the
    same kernels over a contiguous copy of those heads (and of ``pack_tiers`` over them
    unless rotated); unpacked into heads ``dst`` of pools of ``dst_heads`` heads (of the
    source's format, FP8 with other scales for FP8): those heads as an unpack into pools of
    exactly those heads, every other head untouched (NaN)."""
    h = slice(*src)
    lay = req.layout.__class__(**{**_fields(req.layout), "num_kv_heads": src[1] - src[0]})
    narrow_k = [p[:, h].contiguous() for p in req.k_pools]
    narrow_v = [p[:, h].contiguous() for p in req.v_pools]
    got = K.pack_from_pools(req.k_pools, req.v_pools, req.slots, lay, req.tiers, "t", heads=src)
    alone = K.pack_from_pools(narrow_k, narrow_v, req.slots, lay, req.tiers, "t")
    assert torch.equal(got.payload, alone.payload) and got.header_bytes == alone.header_bytes
    if lay.rotation == "none":  # the format's exact arithmetic: the CPU reference
        slots = req.slots.cpu()
        keys = [k.cpu()[slots[f:]] for k, f in zip(narrow_k, lay.layer_first_pos)]
        values = [v.cpu()[slots[f:]] for v, f in zip(narrow_v, lay.layer_first_pos)]
        ref = pack_tiers(keys, values, lay, req.tiers, "t")
        diff = code_diff(ref.payload, got.payload, lay, req.tiers)  # codes, lsb, words, ulp
        assert torch.equal(ref.payload, got.payload.cpu()), diff
    fp8 = FP8Pool.of(req.fp8.dtype, lay.num_layers, 0.75, 2.0) if req.fp8 else None
    wide = Request(lay, req.tiers, req.slots, req.k_pools, req.v_pools, req.fp8)
    shape = (req.k_pools[0].shape[0], dst_heads, lay.head_dim)
    fill = (
        (lambda: torch.full(shape, 0x7F, dtype=torch.uint8, device=req.slots.device))
        if fp8
        else (
            lambda: torch.full(
                shape, float("nan"), dtype=req.k_pools[0].dtype, device=req.slots.device
            )
        )
    )
    wk, wv = [fill() for _ in narrow_k], [fill() for _ in narrow_v]
    info = K.unpack_to_pools(got.to_tensor(), wk, wv, req.slots, fp8=fp8, heads=dst)
    assert info.tier_counts == got.tier_counts
    nk, nv = wide.empty_pools(fp8=fp8)
    nk = [p[:, : lay.num_kv_heads].contiguous() for p in nk]
    nv = [p[:, : lay.num_kv_heads].contiguous() for p in nv]
    K.unpack_to_pools(got.to_tensor(), nk, nv, req.slots, fp8=fp8)
    others = [i for i in range(dst_heads) if not dst[0] <= i < dst[1]]
    for a, b in zip(wk + wv, nk + nv):
        assert same_bits(a[:, dst[0] : dst[1]], b)
        assert untouched(a[:, others], fp8)
    return got


HEAD_CASES = [
    dict(dtype=torch.bfloat16, head_dim=32, group=16),
    dict(dtype=torch.float16, head_dim=16, group=8, key_block=8, tokens=45),
    dict(dtype=torch.float32, head_dim=16, group=16, key_block=4, layers=3),
    dict(dtype=torch.bfloat16, head_dim=16, group=8, rotation="hadamard"),
    dict(dtype=torch.float8_e4m3fn, head_dim=16, group=16, key_block=8),
    dict(dtype=torch.float8_e5m2, head_dim=16, group=8),
]


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_head_range_in_place(case):
    """Head ranges of wider pools (SGLang's pools under heterogeneous TP), both ends:
    pack heads 1..3 of 4, unpack into heads 2..4 of 5 (and a single head)."""
    req = make_request("cpu", heads=4, **case)
    check_head_range(req, (1, 3), 5, (2, 4))
    check_head_range(req, (3, 4), 2, (0, 1))


def test_head_range_refusals_write_nothing():
    req = make_request("cpu", heads=4, head_dim=16, group=16)
    lay = req.layout.__class__(**{**_fields(req.layout), "num_kv_heads": 2})
    for bad in ((3, 5), (-1, 1), (1, 2), (2, 2)):
        with pytest.raises(SpectrumConfigError, match="head range"):
            K.pack_from_pools(req.k_pools, req.v_pools, req.slots, lay, req.tiers, heads=bad)
    with pytest.raises(SpectrumConfigError, match="pools of 4 KV heads"):
        K.pack_from_pools(req.k_pools, req.v_pools, req.slots, lay, req.tiers)
    buf = K.pack_from_pools(req.k_pools, req.v_pools, req.slots, lay, req.tiers, heads=(0, 2))
    for bad in ((3, 5), (1, 2), (0, 3), None):
        kk, kv = req.empty_pools(1.0)
        with pytest.raises(SpectrumFormatError, match="head"):
            K.unpack_to_pools(buf.to_tensor(), kk, kv, req.slots, heads=bad)
        assert all(bool((p == 1.0).all()) for p in kk + kv)


# --------------------------------------------------------------------------- GPU

GPU_CASES = [
    dict(dtype=torch.bfloat16, head_dim=128, page=1),
    dict(dtype=torch.bfloat16, head_dim=128, page=16, group=32),
    dict(dtype=torch.bfloat16, head_dim=64, page=64),
    dict(dtype=torch.float16, head_dim=256, page=16, group=64),
    dict(dtype=torch.float16, head_dim=128, page=64, group=16),
    dict(dtype=torch.float32, head_dim=128, page=16),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("tokens", [1, 777, 3000])
def test_gpu_pack_unpack_byte_identical(case, tokens):
    """Byte-identical to the CPU reference; against torch's CUDA reference within 1
    LSB: on CUDA ``x / qmax`` by a Python scalar is computed as ``x * (1/qmax)``
    (PyTorch's reciprocal shortcut), one float32 ulp off the IEEE quotient the
    format specifies, which can flip the fp16 rounding of a scale (bf16 inputs
    rarely hit it, fp16/fp32 ones do: see the printed stats)."""
    req = make_request("cuda", layers=4, heads=8, tokens=tokens, seed=tokens, **case)
    stats = check_request(req, mode="cpu")
    print(f"GPU {case} T={tokens} vs CUDA torch reference: {stats}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 100, 3000])
def test_gpu_channel_keys_byte_identical(dtype, tokens):
    """Per-channel key scales (64-row blocks) on the GPU: byte-identical to the CPU
    reference, within 1 LSB / 1 fp16 ulp of torch's CUDA reference."""
    req = gpu_request(tokens, dtype=dtype, key_block=64)
    stats = check_request(req, mode="cpu")
    print(f"GPU channel keys {dtype} T={tokens} vs CUDA torch reference: {stats}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("head_dim,group", [(128, 128), (128, 32), (64, 16)])
def test_gpu_hadamard_within_one_lsb(head_dim, group):
    req = make_request(
        "cuda", layers=4, heads=8, tokens=2000, head_dim=head_dim, group=group, rotation="hadamard"
    )
    stats = check_request(req, mode="bound")
    print(f"GPU hadamard D={head_dim} g={group}: {stats}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_gpu_head_range_in_place(case):
    """test_head_range_in_place compiled, at serving shapes: heads 2..6 of 8 packed in
    place (the CPU reference's bytes), unpacked into heads 4..8 of 8 and 0..4 of 4."""
    # the serving shape replaces the CPU case's (some set tokens or layers), group x8
    shape = dict(layers=4, heads=8, head_dim=128, tokens=3000, page=64, group=case["group"] * 8)
    req = make_request("cuda", **{**case, **shape})
    check_head_range(req, (2, 6), 8, (4, 8))
    check_head_range(req, (0, 4), 4, (0, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("key_block", [0, 64])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_gpu_signed_zeros_store_plus_zero_words(dtype, key_block):
    """test_signed_zeros_store_plus_zero_words compiled (bf16: the ``min.bf16x2`` path),
    FP8 sources too (-0.0 bytes): the CPU reference's bytes, no -0.0 scale word (the
    H200 run: 2 words 32768 ulp off, test_gpu_fp8_source_byte_identical[777-64-e4m3])."""
    req = make_request(
        "cuda", layers=4, heads=8, head_dim=128, tokens=777, dtype=dtype, key_block=key_block
    )
    signed_zero_rows(req, fp8=req.fp8 is not None, block=64)
    stats = check_request(req, mode="cpu")
    got = K.pack_from_pools(req.k_pools, req.v_pools, req.slots, req.layout, req.tiers)
    assert negative_zero_words(got.payload, req.layout, req.tiers) == 0
    print(f"GPU signed zeros {dtype} kb={key_block} vs CUDA torch reference: {stats}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_quantiser_edge_values():
    req = make_request("cuda", layers=2, heads=8, head_dim=128, group=32, tokens=300)
    for p in req.k_pools:
        p[req.slots[:50]] *= 1e6  # beyond the fp16 range
        p[req.slots[50]] = 1.0  # scale 0
    check_request(req, mode="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_torch_divides_by_reciprocal():
    """The cause of the CUDA-reference differences (documentation, not our kernel)."""
    x = torch.randn(1 << 20) * 100
    on_cpu, on_gpu = x / 15, (x.cuda() / 15).cpu()
    recip = x * torch.tensor(1.0 / 15, dtype=torch.float32)
    print(
        "CUDA x/15 != CPU x/15:",
        int((on_cpu != on_gpu).sum()),
        "; CUDA x/15 == x*fp32(1/15):",
        torch.equal(on_gpu, recip),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_checksum_and_scores():
    gen = torch.Generator(device="cuda").manual_seed(1)
    for nbytes in (5, 4 * 8192 * 7 + 12, 64 << 20):
        data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda", generator=gen)
        assert K.fast_checksum(data) == payload_checksum(data)
    req = make_request("cuda", layers=4, heads=8, head_dim=128, tokens=4096)
    keys, _ = req.gathered()
    ref = key_norm_scores(keys, req.layout.num_tokens)
    got = K.key_norm_scores_from_pools(req.k_pools, req.slots, req.layout.layer_first_pos)
    assert float((got - ref).abs().max()) <= 2.0 / 2000
    print("score ranks equal:", float((got == ref).float().mean()))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_unpack_rejects_corruption():
    req = make_request("cuda", layers=2, heads=8, head_dim=128, tokens=500)
    packed = K.pack_from_pools(req.k_pools, req.v_pools, req.slots, req.layout, req.tiers)
    buf = packed.to_tensor()
    read_header(buf)  # the GPU checksum is the reference's
    buf[-3] ^= 1
    kk, kv = req.empty_pools(1.0)
    with pytest.raises(SpectrumFormatError):
        K.unpack_to_pools(buf, kk, kv, req.slots)
    assert all(bool((p == 1.0).all()) for p in kk + kv)
