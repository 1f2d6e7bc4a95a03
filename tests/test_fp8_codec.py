"""The codec with FP8 sources: wire format v2 (source dtype and per-layer scales in the
layout), byte accounting relative to the 16-bit KV, tiers over FP8 (INT8 dominated),
refusals of old versions and inconsistent headers."""

from __future__ import annotations

import struct
import zlib

import msgspec
import pytest
import torch

from sglang_spectrum import FORMAT_VERSION, SpectrumConfig, SpectrumFormatError, decode_kv
from sglang_spectrum.codec import (
    MAGIC,
    PREFIX,
    KVLayout,
    PackedHeader,
    config_layout,
    encode_header,
    make_layout,
    measure_tier_errors,
    pack_kv,
    unpack_kv,
)
from sglang_spectrum.config import SpectrumConfigError
from sglang_spectrum.fp8 import FP8Pool, dequantize_fp8
from sglang_spectrum.policy import Tier, allowed_tiers

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_kv(dtype=E4M3, layers=2, tokens=96, heads=2, dim=32, seed=0):
    """Float8 K/V per layer and their FP8Pool (per-layer scales != 1)."""
    gen = torch.Generator().manual_seed(seed)
    fp8 = FP8Pool.of(dtype, layers, [0.5 * (i + 1) for i in range(layers)], 0.25)
    mag = torch.rand(tokens, 1, 1, generator=gen) * 3 + 0.1
    keys = [
        (torch.randn(tokens, heads, dim, generator=gen) * mag * 4).to(dtype) for _ in fp8.k_scales
    ]
    values = [
        (torch.randn(tokens, heads, dim, generator=gen) * mag).to(dtype) for _ in fp8.v_scales
    ]
    return keys, values, fp8


def test_fp8_layout_accounting():
    cfg = SpectrumConfig(budget=0.3, key_scales="channel")
    lay = config_layout(cfg, 4, 8, 128, "fp8_e4m3", 100)
    bf = config_layout(cfg, 4, 8, 128, torch.bfloat16, 100)
    assert lay.dtype == "float8_e4m3fn" and lay.fp8 and lay.kv_scales == [1.0] * 8
    assert lay.full_nbytes == bf.full_nbytes  # the budget's denominator stays 16-bit
    assert lay.row_nbytes(Tier.FP16) == bf.row_nbytes(Tier.FP16) // 2 == 8 * 128
    assert lay.row_nbytes(Tier.INT4) == bf.row_nbytes(Tier.INT4)
    assert (lay.lossless_budget, bf.lossless_budget) == (0.5, 1.0)
    assert lay.wire_dtype == E4M3 and bf.wire_dtype == torch.bfloat16
    with pytest.raises(SpectrumConfigError, match="kv_scales are for FP8"):
        config_layout(cfg, 4, 8, 128, torch.bfloat16, 100, kv_scales=[1.0] * 8)


def test_int8_is_dominated_over_fp8_sources():
    """Over an FP8 pool the top tier is the pool's own bytes: error 0 at 1 byte per
    element. INT8 costs more (codes + scales) and errs: never worth it, so ``spectrum``
    allocates FP8 + INT4 (tier mode 3) or FP8 alone (mode 2); baselines keep theirs."""
    keys, values, fp8 = fp8_kv()
    lay = make_layout(keys, SpectrumConfig(), fp8=fp8)
    assert lay.row_nbytes(Tier.INT8) > lay.row_nbytes(Tier.FP16)
    assert lay.key_row_nbytes(Tier.INT8) > lay.key_row_nbytes(Tier.FP16)
    err = measure_tier_errors(keys, values, lay)
    assert bool((err[:, Tier.FP16] == 0).all()) and bool((err[:, Tier.INT8] > 0).all())
    assert bool((err[:, Tier.INT4] > err[:, Tier.INT8]).all())
    assert allowed_tiers(SpectrumConfig(tiers="3"), fp8_source=True) == [Tier.FP16, Tier.INT4]
    assert allowed_tiers(SpectrumConfig(tiers="2"), fp8_source=True) == [Tier.FP16]
    assert allowed_tiers(SpectrumConfig(method="int8", budget=0.6), fp8_source=True) == [Tier.INT8]
    for budget in (0.3, 0.4):
        for allocator in ("paper", "optimal"):
            packed = pack_kv(
                keys, values, SpectrumConfig(budget=budget, allocator=allocator), fp8=fp8
            )
            assert packed.tier_counts["int8"] == 0


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_fp8_decode_gives_real_values(dtype):
    """decode_kv of an FP8 source: float32 real values; the top tier exactly
    ``fp8 * scale``, INT4 within half a step of them."""
    keys, values, fp8 = fp8_kv(dtype)
    packed = pack_kv(keys, values, SpectrumConfig(budget=0.35, key_scales="channel"), fp8=fp8)
    assert packed.tier_counts["fp16"] > 4 and packed.tier_counts["int4"] > 0
    dk, dv, kept = decode_kv(packed.to_bytes())
    assert dk[0].dtype == torch.float32 and bool(kept.all())
    top = packed.tiers == int(Tier.FP16)
    for layer in range(2):
        for src, dec, key in ((keys, dk, True), (values, dv, False)):
            real = dequantize_fp8(src[layer], dtype, fp8.scale(layer, key))
            assert torch.equal(dec[layer][top], real[top])
            # half a step of the widest range, plus the fp16 rounding of scale and minimum
            step = float(real.max() - real.min()) / 15
            bound = 0.5 * step + 2.0**-10 * (2 * float(real.abs().max()) + step) + 1e-6
            assert float((dec[layer] - real).abs().max()) <= bound


def test_fp8_pack_kv_arguments_are_checked():
    keys, values, fp8 = fp8_kv()
    with pytest.raises(SpectrumConfigError, match="fp8 describes"):
        pack_kv(keys, values, SpectrumConfig(), fp8=FP8Pool.of(E5M2, 2))
    with pytest.raises(SpectrumConfigError, match="fp8 describes"):
        pack_kv(keys, values, SpectrumConfig(), fp8=FP8Pool.of(E4M3, 3))
    bf = [k.float().to(torch.bfloat16) for k in keys]
    with pytest.raises(SpectrumConfigError, match="fp8 describes"):
        pack_kv(bf, bf, SpectrumConfig(), fp8=fp8)
    default = pack_kv(keys, values, SpectrumConfig(budget=0.5))  # float8 without fp8: scale 1
    assert default.layout.kv_scales == [1.0] * 4 and default.tier_counts["fp16"] == 96


def test_fp8_unpack_kv_needs_the_pools_meaning():
    keys, values, fp8 = fp8_kv()
    data = pack_kv(keys, values, SpectrumConfig(budget=0.35), fp8=fp8).to_bytes()
    pools = [torch.full((100, 2, 32), 7, dtype=torch.uint8) for _ in range(2)]
    with pytest.raises(SpectrumFormatError, match="FP8Pool"):
        unpack_kv(data, pools, pools, torch.arange(96))
    assert all(bool((p == 7).all()) for p in pools)
    unpack_kv(data, pools, [p.clone() for p in pools], torch.arange(96), fp8=fp8)
    assert not bool((pools[0][:96] == 7).all())


def _raw(header: PackedHeader, version: int = FORMAT_VERSION) -> bytes:
    body = msgspec.msgpack.encode(header)
    return PREFIX.pack(MAGIC, version, 0, len(body), zlib.crc32(body)) + body


def test_format_version_2_and_refusals():
    """Version 2 carries the source dtype and scales; a v1 buffer (no kv_scales) is
    refused with the version message, headers whose dtype and scales disagree are
    refused as malformed layouts, before any write."""
    assert FORMAT_VERSION == 2
    keys, values, fp8 = fp8_kv()
    packed = pack_kv(keys, values, SpectrumConfig(budget=0.35), fp8=fp8)
    data = packed.to_bytes()
    assert struct.unpack_from("<H", data, 4)[0] == 2
    pools = [torch.full((100, 2, 32), 7, dtype=torch.uint8) for _ in range(4)]
    v1 = bytearray(data)
    v1[4:6] = (1).to_bytes(2, "little")
    with pytest.raises(SpectrumFormatError, match="buffer is v1, this SpectrumKV reads v2"):
        unpack_kv(bytes(v1), pools[:2], pools[2:], torch.arange(96), fp8=fp8)
    h = packed.header
    fields = {f: getattr(h.layout, f) for f in h.layout.__struct_fields__}
    payload = packed.payload.numpy().tobytes()
    forged = [
        ({**fields, "kv_scales": fields["kv_scales"][:3]}, "kv_scales expected"),
        ({**fields, "kv_scales": [0.0] * 4}, "kv_scales must be"),
        ({**fields, "dtype": "bfloat16"}, "kv_scales expected"),
        ({**fields, "dtype": "float8_e4m3fnuz"}, "unknown dtype"),
    ]
    for layout, message in forged:
        bad = PackedHeader(KVLayout(**layout), h.tier_map, h.offsets, h.payload_nbytes, h.checksum)
        raw = _raw(bad)
        raw += bytes(-len(raw) % 64) + payload
        with pytest.raises(SpectrumFormatError, match=message):
            unpack_kv(raw, pools[:2], pools[2:], torch.arange(96), fp8=fp8)
    assert all(bool((p == 7).all()) for p in pools)
    assert encode_header(h) == packed.header_bytes
