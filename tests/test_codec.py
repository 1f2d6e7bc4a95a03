"""The packed KV codec on random KV: round trips, byte accounting, format errors."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_spectrum import (
    FORMAT_VERSION,
    SpectrumConfig,
    SpectrumConfigError,
    SpectrumFormatError,
    Tier,
    decode_kv,
    pack_kv,
    unpack_kv,
)
from sglang_spectrum.codec import (
    PREFIX,
    dequantize_channels,
    encode_header,
    fixed_overhead,
    make_layout,
    pack_tiers,
    payload_checksum,
    quantize,
    quantize_channels,
)

BUDGETS = (0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


def random_kv(layers=4, tokens=512, heads=3, dim=64, dtype=torch.bfloat16, seed=0, short=()):
    """Per-layer K/V; layers in ``short`` hold only the last 128 positions."""
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for layer in range(layers):
        n = min(128, tokens) if layer in short else tokens
        # Per-token magnitudes vary, as in real caches (and give the optimal allocator work).
        mag = torch.rand(n, 1, 1, generator=g) * 3 + 0.1
        keys.append((torch.randn(n, heads, dim, generator=g) * mag).to(dtype))
        values.append((torch.randn(n, heads, dim, generator=g) * mag).to(dtype))
    return keys, values


def empty_pools(layers, slots, heads, dim, dtype=torch.bfloat16, fill=0.0):
    k = [torch.full((slots, heads, dim), fill, dtype=dtype) for _ in range(layers)]
    v = [torch.full((slots, heads, dim), fill, dtype=dtype) for _ in range(layers)]
    return k, v


def quant_bound(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-element bound of |x - dequant(quant(x))|: half a step, plus the float16
    rounding of the stored scale and minimum (relative 2**-11 each)."""
    n, h, d = x.shape
    xg = x.float().reshape(n, h, d // group, group)
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    qmax = (1 << bits) - 1
    step = (hi - lo) / qmax
    slack = 2.0**-10 * (lo.abs() + hi.abs() + step) + 1e-6
    return (0.5 * step + slack).expand_as(xg).reshape(n, h, d)


@pytest.mark.parametrize("tier,bits", [(Tier.INT8, 8), (Tier.INT4, 4)])
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_round_trip_error_within_quantiser_bound(tier, bits, group, dim):
    keys, values = random_kv(layers=2, tokens=40, dim=dim)
    config = SpectrumConfig(budget=1.0, group_size=group)
    layout = make_layout(keys, config)
    tiers = torch.full((40,), int(tier), dtype=torch.uint8)
    tiers[:3] = int(Tier.FP16)
    packed = pack_tiers(keys, values, layout, tiers)
    dk, dv, kept = decode_kv(packed.to_bytes(), dtype=torch.float32)
    assert kept.all()
    g = layout.group_size
    for src, out in [(keys[0], dk[0]), (values[1], dv[1])]:
        err = (src.float() - out).abs()
        assert (err[3:] <= quant_bound(src[3:], bits, g)).all()
        assert torch.equal(out[:3], src[:3].float())  # FP16 rows are exact


def test_quantize_edge_cases_constant_and_huge_groups():
    x = torch.zeros(2, 1, 8)
    x[1] = 7.0  # constant groups: scale 0 must not divide by zero
    codes, scales = quantize(x, 4, 8)
    assert torch.isfinite(scales.float()).all()
    keys = [torch.full((3, 1, 8), 1e6)]  # beyond float16: clamped, still finite
    layout = make_layout(keys, SpectrumConfig())
    packed = pack_tiers(keys, keys, layout, torch.full((3,), int(Tier.INT8), dtype=torch.uint8))
    dk, _, _ = decode_kv(packed.to_bytes(), dtype=torch.float32)
    assert torch.isfinite(dk[0]).all()


@pytest.mark.parametrize("tiers", ["3", "2"])
@pytest.mark.parametrize("allocator", ["paper", "optimal"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_packed_bytes_within_budget_and_use_it(tiers, allocator, budget):
    keys, values = random_kv()
    packed = pack_kv(keys, values, SpectrumConfig(budget=budget, tiers=tiers, allocator=allocator))
    full = packed.full_nbytes
    if budget < 1.0:
        assert packed.nbytes <= math.floor(budget * full)
        assert packed.nbytes >= 0.99 * budget * full
    else:  # lossless; only the header rides on top
        assert packed.tier_counts["fp16"] == 512
        assert packed.nbytes <= full + fixed_overhead(packed.layout)
    counts = packed.tier_counts
    assert sum(counts.values()) == 512
    if tiers == "2":
        assert counts["int4"] == 0
    # Drop only what no cheaper tier can afford.
    cheapest = Tier.INT4 if tiers == "3" else Tier.INT8
    if counts["drop"]:
        assert budget * full < 508 * packed.layout.token_costs()[0, cheapest]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_budget_one_is_lossless(dtype):
    keys, values = random_kv(dtype=dtype, short=(1,))
    packed = pack_kv(keys, values, SpectrumConfig(budget=1.0))
    kp, vp = empty_pools(4, 600, 3, 64, dtype)
    slots = torch.randperm(600)[:512]
    info = unpack_kv(packed.to_bytes(), kp, vp, slots)
    assert info.dropped.numel() == 0
    for layer in range(4):
        first = 512 - keys[layer].shape[0]
        assert torch.equal(kp[layer][slots[first:]], keys[layer])
        assert torch.equal(vp[layer][slots[first:]], values[layer])


@pytest.mark.parametrize("method", ["spectrum", "snapkv", "pdtrim"])
@pytest.mark.parametrize("budget", BUDGETS[:-1])
def test_sinks_always_fp16(method, budget):
    keys, values = random_kv(seed=3)
    packed = pack_kv(keys, values, SpectrumConfig(budget=budget, method=method, sinks=4))
    assert (packed.tiers[:4] == int(Tier.FP16)).all()


def test_sliding_window_layers_carry_only_held_positions():
    keys, values = random_kv(layers=4, tokens=300, short=(0, 2))
    config = SpectrumConfig(budget=0.4)
    packed = pack_kv(keys, values, config)
    layout = packed.layout
    assert layout.layer_first_pos == [172, 0, 172, 0]
    assert packed.full_nbytes == (128 * 2 + 300 * 2) * 2 * 3 * 64 * 2
    # Tokens before the window cost only the two full layers.
    costs = layout.token_costs()
    assert costs[0, 0] * 2 == costs[-1, 0]
    kp, vp = empty_pools(4, 300, 3, 64, fill=float("nan"))
    info = unpack_kv(packed.to_tensor(), kp, vp, torch.arange(300))
    kept = info.kept
    for layer in (0, 2):
        assert torch.isnan(kp[layer][:172]).all()  # never written
        assert not torch.isnan(kp[layer][172:][kept[172:]]).any()
    assert not torch.isnan(kp[1][kept]).any()
    assert torch.isnan(kp[1][~kept]).all()


def test_dropped_tokens_reported_and_not_written():
    keys, values = random_kv(tokens=256)
    packed = pack_kv(keys, values, SpectrumConfig(budget=0.2, tiers="2"))
    assert packed.tier_counts["drop"] > 0
    kp, vp = empty_pools(4, 256, 3, 64, fill=float("nan"))
    info = unpack_kv(packed.to_bytes(), kp, vp, torch.arange(256))
    dropped = torch.nonzero(packed.tiers == int(Tier.DROP)).flatten()
    assert torch.equal(info.dropped, dropped)
    assert torch.isnan(kp[0][dropped]).all() and not torch.isnan(kp[0][info.kept]).any()


def test_baselines_shape_and_bytes():
    keys, values = random_kv(seed=5)
    full = pack_kv(keys, values, SpectrumConfig(budget=1.0, method="full"))
    assert full.tier_counts == {"fp16": 512, "int8": 0, "int4": 0, "drop": 0}
    for method, tier in [("int8", "int8"), ("int4", "int4")]:
        p = pack_kv(keys, values, SpectrumConfig(budget=0.6, method=method))
        assert p.tier_counts[tier] == 512 and p.nbytes <= 0.6 * p.full_nbytes
    # Uniform INT4 at a budget below its cost drops the least important tokens.
    p = pack_kv(keys, values, SpectrumConfig(budget=0.2, method="int4"))
    assert 0 < p.tier_counts["drop"] < 512 and p.nbytes <= 0.2 * p.full_nbytes
    pd = pack_kv(keys, values, SpectrumConfig(budget=0.3, method="pdtrim"))
    kept = torch.nonzero(pd.tiers == int(Tier.FP16)).flatten().tolist()
    head = [t for t in kept if t < 256]
    tail = [t for t in kept if t >= 256]
    assert head == list(range(len(head))) and tail == list(range(512 - len(tail), 512))
    assert pd.nbytes <= 0.3 * pd.full_nbytes and pd.nbytes >= 0.29 * pd.full_nbytes
    scores = torch.rand(512)
    sk = pack_kv(keys, values, SpectrumConfig(budget=0.3, method="snapkv"), scores=scores)
    kept = sk.tiers == int(Tier.FP16)
    assert set(sk.tier_counts) and sk.tier_counts["int8"] == sk.tier_counts["int4"] == 0
    # Top-k: every kept non-sink token scores at least as high as every dropped one.
    assert scores[4:][kept[4:]].min() >= scores[4:][~kept[4:]].max()


def _weighted_error(packed, keys, values, weights):
    dk, dv, _ = decode_kv(packed.to_bytes(), dtype=torch.float32)
    err = torch.zeros(keys[0].shape[0])
    for a, b, c, d in zip(keys, dk, values, dv):
        err += ((a.float() - b) ** 2).sum((1, 2)) + ((c.float() - d) ** 2).sum((1, 2))
    return float((err * weights).sum())


@pytest.mark.parametrize("budget", [0.3, 0.4, 0.5])
def test_optimal_allocator_beats_paper_on_weighted_error(budget):
    keys, values = random_kv(seed=7)
    scores = torch.rand(512)
    w = (scores - scores.min()) / (scores.max() - scores.min()) + 1e-3
    errs = {}
    for alloc in ("paper", "optimal"):
        cfg = SpectrumConfig(budget=budget, allocator=alloc, sinks=0, window=0)
        errs[alloc] = _weighted_error(pack_kv(keys, values, cfg, scores=scores), keys, values, w)
    assert errs["optimal"] < errs["paper"]


def test_paper_allocator_orders_by_importance():
    keys, values = random_kv(seed=2)
    scores = torch.rand(512)
    packed = pack_kv(keys, values, SpectrumConfig(budget=0.5, sinks=0, window=0), scores=scores)
    order = torch.argsort(scores, descending=True)
    # Walking down the ranking, the tier never gets more precise (FP16 < INT8 < INT4 < DROP).
    assert (torch.diff(packed.tiers[order].long()) >= 0).all()


def test_hadamard_rotation_round_trip_and_outlier_channels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, 128, generator=g)
    x[..., 5] *= 40  # an outlier channel, as keys have
    keys, values = [x.to(torch.bfloat16)], [x.to(torch.bfloat16)]
    errs = {}
    for rot in ("none", "hadamard"):
        cfg = SpectrumConfig(budget=1.0, method="int4", rotation=rot)
        packed = pack_kv(keys, values, cfg)
        assert packed.layout.rotation == rot
        dk, _, _ = decode_kv(packed.to_bytes(), dtype=torch.float32)
        errs[rot] = float(((dk[0] - keys[0].float()) ** 2).mean())
    assert errs["hadamard"] < 0.5 * errs["none"]
    with pytest.raises(SpectrumConfigError, match="power-of-two"):
        pack_kv(
            [torch.randn(4, 1, 96)], [torch.randn(4, 1, 96)], SpectrumConfig(rotation="hadamard")
        )


# --- per-channel key scales (KIVI) --------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim,rows,block", [(64, 150, 64), (128, 64, 64), (64, 7, 4)])
def test_channel_quantiser_error_bound(bits, dim, rows, block):
    g = torch.Generator().manual_seed(dim + rows)
    x = torch.randn(rows, 2, dim, generator=g) * torch.rand(1, 1, dim, generator=g) * 10
    codes, scales = quantize_channels(x, bits, block)
    assert codes.shape == (rows, 2, dim * bits // 8)
    assert scales.shape == (-(-rows // block), 2, dim, 2) and scales.dtype == torch.float16
    err = (dequantize_channels(codes, scales, bits, dim, block) - x).abs()
    # the per-group bound of quant_bound, with groups = (block of rows, head, channel)
    pad = torch.cat([x, x[-1:].expand(-(-rows // block) * block - rows, 2, dim)])
    blocks = pad.reshape(-1, block, 2, dim).permute(0, 2, 3, 1)  # [nb, H, D, block]
    bound = quant_bound(blocks.reshape(-1, 2 * dim, block), bits, block)
    bound = bound.reshape(-1, 2, dim, block).permute(0, 3, 1, 2).reshape(-1, 2, dim)[:rows]
    assert bool((err <= bound).all()), float((err - bound).max())


def outlier_keys(layers=3, tokens=300, heads=2, dim=64, seed=0):
    """Random KV whose keys have a large and a shifted channel, as RoPE'd / biased keys do."""
    keys, values = random_kv(layers, tokens, heads, dim, torch.float32, seed, short=(1,))
    for k in keys:
        k[..., 5] *= 30
        k[..., 9] += 20
    return [k.to(torch.bfloat16) for k in keys], [v.to(torch.bfloat16) for v in values]


@pytest.mark.parametrize("tiers", ["3", "2"])
@pytest.mark.parametrize("budget", [0.25, 0.3, 0.5, 0.75])
def test_channel_key_scales_within_budget_and_round_trip(tiers, budget):
    keys, values = outlier_keys()
    cfg = SpectrumConfig(budget=budget, tiers=tiers, key_scales="channel", allocator="optimal")
    packed = pack_kv(keys, values, cfg)
    assert packed.layout.key_block == 64
    assert packed.nbytes <= math.floor(budget * packed.full_nbytes)
    assert packed.nbytes >= 0.95 * budget * packed.full_nbytes  # one partial block reserved
    dk, dv, kept = decode_kv(packed.to_bytes(), dtype=torch.float32)
    kp, vp = empty_pools(3, 300, 2, 64)
    info = unpack_kv(packed.to_bytes(), kp, vp, torch.arange(300))
    for layer in range(3):
        first = 300 - keys[layer].shape[0]
        held = kept[first:]
        assert torch.equal(kp[layer][first:][held].float(), dk[layer][held].bfloat16().float())
        assert torch.equal(vp[layer][first:][held].float(), dv[layer][held].bfloat16().float())
    assert info.dropped.numel() == int((~kept).sum())


def test_channel_key_scales_resolve_outlier_channels():
    keys, values = outlier_keys()
    errs = {}
    for ks in ("token", "channel"):
        packed = pack_kv(keys, values, SpectrumConfig(budget=1.0, method="int4", key_scales=ks))
        dk, dv, _ = decode_kv(packed.to_bytes(), dtype=torch.float32)
        errs[ks] = sum(float(((a - k.float()) ** 2).sum()) for a, k in zip(dk, keys))
        v_err = sum(float(((a - v.float()) ** 2).sum()) for a, v in zip(dv, values))
        errs[ks + " values"] = v_err
        errs[ks + " ratio"] = packed.bytes_ratio
    # same bytes per token at head_dim 64 (64 rows x 4 bytes of scales per channel),
    # plus each layer's last, partial block
    assert errs["token ratio"] < errs["channel ratio"] < errs["token ratio"] + 0.003
    assert errs["channel"] < 0.5 * errs["token"]
    assert errs["channel values"] == errs["token values"]  # values stay per token


def test_header_claiming_other_key_scales_is_rejected():
    keys, values = random_kv(tokens=128)
    packed = pack_kv(keys, values, SpectrumConfig(budget=0.4))
    h = packed.header
    layout = type(h.layout)(**{**msgspec_fields(h.layout), "key_block": 64})
    forged = type(h)(layout, h.tier_map, h.offsets, h.payload_nbytes, h.checksum)
    kp, vp = empty_pools(4, 128, 3, 64)
    with pytest.raises(SpectrumFormatError, match="offsets"):
        unpack_kv(encode_header(forged) + packed.payload.numpy().tobytes(), kp, vp, range(128))
    layout = type(h.layout)(**{**msgspec_fields(h.layout), "key_block": 1})
    forged = type(h)(layout, h.tier_map, h.offsets, h.payload_nbytes, h.checksum)
    with pytest.raises(SpectrumFormatError, match="key_block"):
        unpack_kv(encode_header(forged) + packed.payload.numpy().tobytes(), kp, vp, range(128))


def msgspec_fields(struct) -> dict:
    return {f: getattr(struct, f) for f in struct.__struct_fields__}


# --- malformed input ----------------------------------------------------------------------


@pytest.fixture
def packed_and_pools():
    keys, values = random_kv(tokens=128, short=(3,))
    packed = pack_kv(keys, values, SpectrumConfig(budget=0.4))
    kp, vp = empty_pools(4, 128, 3, 64, fill=1.5)
    return packed, kp, vp


def _corrupt(data: bytes, pos: int, xor: int = 0x40) -> bytes:
    out = bytearray(data)
    out[pos] ^= xor
    return bytes(out)


def _cases(packed):
    data = packed.to_bytes()
    start = len(packed.header_bytes)
    wrong_version = bytearray(data)
    wrong_version[4:6] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    body_len = int.from_bytes(data[8:12], "little")
    return {
        "payload bit flip": (_corrupt(data, start + 1000), "payload checksum"),
        "last payload byte": (_corrupt(data, len(data) - 1, 1), "payload checksum"),
        "header bit flip": (_corrupt(data, PREFIX.size + 5), "header checksum"),
        "truncated payload": (data[:-7], "truncated"),
        "truncated header": (data[: PREFIX.size + body_len // 2], "truncated"),
        "prefix only": (data[:10], "shorter than"),
        "wrong version": (bytes(wrong_version), "version mismatch"),
        "bad magic": (b"XXXX" + data[4:], "not a SpectrumKV buffer"),
        "empty": (b"", "empty"),
        "random bytes": (torch.randint(0, 256, (4096,), dtype=torch.uint8), "not a SpectrumKV"),
        "wrong dtype tensor": (torch.zeros(64, dtype=torch.int32), "uint8"),
    }


def test_malformed_buffers_raise_and_leave_pools_untouched(packed_and_pools):
    packed, kp, vp = packed_and_pools
    before = [t.clone() for t in kp + vp]
    for name, (data, message) in _cases(packed).items():
        with pytest.raises(SpectrumFormatError, match=message):
            unpack_kv(data, kp, vp, torch.arange(128))
        assert all(torch.equal(a, b) for a, b in zip(before, kp + vp)), name


def test_consistent_but_forged_header_is_rejected(packed_and_pools):
    packed, kp, vp = packed_and_pools
    h = packed.header
    tier_map = bytearray(h.tier_map)
    tier_map[50] = 9  # an unknown tier, with a valid header CRC
    forged = type(h)(h.layout, bytes(tier_map), h.offsets, h.payload_nbytes, h.checksum)
    data = encode_header(forged) + packed.payload.numpy().tobytes()
    with pytest.raises(SpectrumFormatError, match="unknown tier"):
        unpack_kv(data, kp, vp, torch.arange(128))
    tier_map[50] = int(Tier.DROP) if h.tier_map[50] != int(Tier.DROP) else int(Tier.FP16)
    forged = type(h)(h.layout, bytes(tier_map), h.offsets, h.payload_nbytes, h.checksum)
    with pytest.raises(SpectrumFormatError, match="offsets"):
        unpack_kv(encode_header(forged) + packed.payload.numpy().tobytes(), kp, vp, range(128))


def test_bad_destination_raises_before_writing(packed_and_pools):
    packed, kp, vp = packed_and_pools
    data = packed.to_bytes()
    before = [t.clone() for t in kp]
    with pytest.raises(SpectrumFormatError, match="layers"):
        unpack_kv(data, kp[:3], vp[:3], torch.arange(128))
    with pytest.raises(SpectrumFormatError, match="out of range"):
        unpack_kv(data, kp, vp, torch.arange(128) + 1)
    with pytest.raises(SpectrumFormatError, match="slot_indices"):
        unpack_kv(data, kp, vp, torch.arange(127))
    small = [t[:, :2] for t in kp]
    with pytest.raises(SpectrumFormatError, match="pools must be"):
        unpack_kv(data, small, small, torch.arange(128))
    assert all(torch.equal(a, b) for a, b in zip(before, kp))


def test_trailing_bytes_are_ignored(packed_and_pools):
    packed, kp, vp = packed_and_pools
    info = unpack_kv(packed.to_bytes() + bytes(1000), kp, vp, torch.arange(128))
    assert info.num_tokens == 128


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"budget": 0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": "half"}, "budget"),
        ({"tiers": "4"}, "tiers"),
        ({"allocator": "magic"}, "allocator"),
        ({"method": "full", "budget": 0.5}, "full"),
        ({"group_size": 3}, "group_size"),
        ({"rotation": "fourier"}, "rotation"),
        ({"key_scales": "block"}, "key_scales"),
        ({"key_block": 1}, "key_block"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(SpectrumConfigError, match=message):
        SpectrumConfig(**kwargs)


def test_bad_inputs_to_pack_are_clear_errors():
    keys, values = random_kv(layers=2, tokens=16)
    with pytest.raises(SpectrumConfigError, match="same"):
        pack_kv(keys, values[:1], SpectrumConfig())
    with pytest.raises(SpectrumConfigError, match="tokens, kv_heads, head_dim"):
        pack_kv([keys[0][0]], [values[0][0]], SpectrumConfig())
    with pytest.raises(SpectrumConfigError, match="does not divide"):
        pack_kv(keys, values, SpectrumConfig(group_size=48))
    with pytest.raises(SpectrumConfigError, match="sink"):
        pack_kv(keys, values, SpectrumConfig(budget=0.01, sinks=8))
    with pytest.raises(SpectrumConfigError, match="scores"):
        pack_kv(keys, values, SpectrumConfig(), scores=torch.rand(5))


def test_checksum_detects_swaps_and_is_device_independent():
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8)
    c = payload_checksum(data)
    swapped = data.clone()
    swapped[0:4], swapped[4:8] = data[4:8].clone(), data[0:4].clone()
    assert payload_checksum(swapped) != c
    assert payload_checksum(data.clone()) == c and c < 2**62


@pytest.mark.parametrize("tiers", ["3", "2"])
def test_no_drop_mode_raises_the_budget_instead_of_dropping(tiers):
    keys, values = random_kv(tokens=24)  # short: sinks + header weigh a lot
    cfg = SpectrumConfig(budget=0.2, tiers=tiers, allow_drop=False)
    packed = pack_kv(keys, values, cfg)
    assert packed.tier_counts["drop"] == 0
    assert pack_kv(keys, values, cfg.with_(allow_drop=True)).tier_counts["drop"] > 0
    long_keys, long_values = random_kv(tokens=512)
    packed = pack_kv(long_keys, long_values, SpectrumConfig(budget=0.4, allow_drop=False))
    assert packed.tier_counts["drop"] == 0 and packed.nbytes <= 0.4 * packed.full_nbytes
