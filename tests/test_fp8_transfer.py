"""The request path with FP8 pools (``transfer.pack_request`` / ``unpack_request`` with
``fp8=FP8Pool``): SGLang's uint8 FP8 buffers as the prefill's and/or the decode's pools.

CPU tests run the torch path against the codec reference (``pack_kv`` of the float8
KV) and, with the ``kernel_path`` fixture, the Triton kernels under the interpreter.
Tests marked ``gpu`` run the kernel path on CUDA pools and skip cleanly without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CUDA, emulate_zero_minus_x
from test_transfer import kernel_path, make_pools, region  # noqa: F401 (kernel_path: fixture)

from sglang_spectrum import receive
from sglang_spectrum.codec import (
    config_layout,
    decode_kv,
    fixed_overhead,
    header_tier_map,
    pack_kv,
    pack_tiers,
    read_header,
    token_budget,
)
from sglang_spectrum.config import SpectrumConfig, SpectrumConfigError, SpectrumFormatError
from sglang_spectrum.fp8 import FP8Pool, dequantize_fp8, quantize_fp8
from sglang_spectrum.policy import Tier
from sglang_spectrum.transfer import (
    pack_request,
    packed_size_bound,
    part_offset,
    pool_pair_problem,
    unpack_request,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
LAYERS = 3


def fp8_of(dtype: torch.dtype, layers: int = LAYERS) -> FP8Pool:
    """Per-layer scales other than 1.0 (as a checkpoint with KV scales gives)."""
    return FP8Pool.of(dtype, layers, [0.5 * (i + 1) for i in range(layers)], 0.25)


def make_fp8_pools(fp8: FP8Pool, device="cpu", **kw):
    """``make_pools`` KV stored as SGLang's FP8 pools: uint8 ``(x / scale).to(fp8)``.
    Returns (k_pools, v_pools, slots)."""
    kp, vp, slots = make_pools(layers=fp8.num_layers, dtype=torch.float32, **kw)
    k = [quantize_fp8(p, fp8.dtype, fp8.k_scales[i]).to(device) for i, p in enumerate(kp)]
    v = [quantize_fp8(p, fp8.dtype, fp8.v_scales[i]).to(device) for i, p in enumerate(vp)]
    return k, v, slots.to(device)


def fp8_region(k_pools, slots, config, fp8: FP8Pool):
    _, heads, head_dim = k_pools[0].shape
    n = packed_size_bound(slots.numel(), len(k_pools), heads, head_dim, fp8.dtype, config)
    return torch.full((n,), 0xA5, dtype=torch.uint8, device=k_pools[0].device)


def fp8_empty(like, fill=0x7F):
    """FP8 pools like ``like`` full of NaN bits (0x7F in both formats)."""
    return [torch.full_like(p, fill) for p in like]


def check_fp8_unpack(out, nbytes, checksum, pools, fp8: FP8Pool | None, slots):
    """Unpack ``out`` into fresh pools like ``pools`` (FP8 ``fp8``, or 16-bit): every kept
    row equals the decode's float32 values as those pools store them, dropped ones are
    untouched (NaN)."""
    ok = fp8_empty(pools) if fp8 else [torch.full_like(p, float("nan")) for p in pools]
    ov = fp8_empty(pools) if fp8 else [torch.full_like(p, float("nan")) for p in pools]
    info = unpack_request(out, ok, ov, slots, expected_checksum=checksum, fp8=fp8)
    dk, dv, kept = decode_kv(out[:nbytes].cpu(), dtype=torch.float32)
    for layer in range(len(pools)):
        for got, dec, key in ((ok, dk, True), (ov, dv, False)):
            rows = got[layer][slots].cpu()
            if fp8 is not None:
                want = quantize_fp8(dec[layer], fp8.dtype, fp8.scale(layer, key))
                assert bool((rows[~kept] == 0x7F).all())
            else:
                want = dec[layer].to(rows.dtype)
                assert bool(torch.isnan(rows[~kept].float()).all())
            same = rows[kept].view(torch.uint8) == want[kept].view(torch.uint8)
            assert bool(same.all()), (layer, key)
    return ok, ov, info


FP8_CONFIGS = [
    SpectrumConfig(budget=0.35, allow_drop=False, key_scales="channel"),
    SpectrumConfig(budget=0.42, allow_drop=False, group_size=16),  # its INT4 floor: 0.375
    SpectrumConfig(budget=0.5, allow_drop=False, key_scales="channel", key_block=16),
    SpectrumConfig(budget=0.3, allow_drop=False, tiers="2"),  # FP8 alone: the floor is 0.5
    SpectrumConfig(budget=0.35, allocator="optimal", allow_drop=False),
    SpectrumConfig(budget=0.25, method="int4", allow_drop=True),
]


@pytest.mark.parametrize(
    "config", FP8_CONFIGS, ids=lambda c: f"{c.method}-{c.allocator}-{c.tiers}-{c.budget}"
)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_fp8_pack_matches_pack_kv_within_budget_and_round_trips(config, dtype):
    fp8 = fp8_of(dtype)
    kp, vp, slots = make_fp8_pools(fp8, tokens=400, seed=11)
    out = fp8_region(kp, slots, config, fp8)
    res = pack_request(kp, vp, slots, config, out=out, fp8=fp8)
    assert res.path == "torch" and res.nbytes <= out.numel()
    keys = [k[slots].view(dtype) for k in kp]
    values = [v[slots].view(dtype) for v in vp]
    ref = pack_kv(keys, values, config, fp8=fp8)
    assert out[: res.nbytes].numpy().tobytes() == ref.to_bytes()
    assert res.tier_counts == ref.tier_counts and res.tier_counts["int8"] == 0
    header, payload = read_header(out[: res.nbytes])
    assert header.layout.dtype == fp8.name and header.layout.kv_scales == fp8.scales
    # the budget is relative to the 16-bit KV; at 0.5 (or the FP8-only floor) all is FP8
    assert res.full_nbytes == 400 * LAYERS * 2 * 2 * 2 * 32
    lossless = config.budget >= 0.5 or (config.method == "spectrum" and config.tiers == "2")
    if lossless:
        assert res.tier_counts["fp16"] == 400
        assert payload.numel() == res.full_nbytes // 2  # the pools' bytes, nothing else
    else:
        assert res.nbytes <= math.floor(config.budget * res.full_nbytes)
    if config.method == "spectrum" and config.budget == 0.35:  # the mixed FP8/INT4 range
        assert res.tier_counts["fp16"] > 40 and res.tier_counts["int4"] > 200, res.tier_counts
    # unpack into the same FP8 pools at other slots: top tier = the source's bytes
    _, _, dst = make_pools(tokens=400, seed=12, spare_pages=5)
    pools = [torch.zeros(int(dst.max()) + 1, 2, 32, dtype=torch.uint8) for _ in range(LAYERS)]
    ok, ov, info = check_fp8_unpack(out, res.nbytes, res.checksum, pools, fp8, dst)
    top = header_tier_map(header) == int(Tier.FP16)
    for layer in range(LAYERS):
        assert torch.equal(ok[layer][dst[top]], kp[layer][slots[top]])
        assert torch.equal(ov[layer][dst[top]], vp[layer][slots[top]])
    assert info.layout.dtype == fp8.name


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("key_scales", ["token", "channel"])
def test_fp8_budget_half_is_lossless(dtype, key_scales):
    """b=0.5 over FP8 pools: every token in FP8, unpacked bit-identically into FP8 pools
    of the same scales (header on top of the budget, as at b=1.0 for 16-bit pools), and
    into bf16 pools as ``(fp8 * scale).to(bf16)``."""
    fp8 = fp8_of(dtype)
    kp, vp, slots = make_fp8_pools(fp8, tokens=150, seed=3)
    cfg = SpectrumConfig(budget=0.5, allow_drop=False, key_scales=key_scales)
    out = fp8_region(kp, slots, cfg, fp8)
    res = pack_request(kp, vp, slots, cfg, out=out, fp8=fp8)
    header, _ = read_header(out[: res.nbytes])
    lay = header.layout
    assert res.tier_counts == {"fp16": 150, "int8": 0, "int4": 0, "drop": 0}
    assert res.nbytes <= res.full_nbytes // 2 + fixed_overhead(lay)
    ok, ov = fp8_empty(kp), fp8_empty(vp)
    unpack_request(out, ok, ov, slots, expected_checksum=res.checksum, fp8=fp8)
    for mine, theirs in zip(ok + ov, kp + vp):
        assert torch.equal(mine[slots], theirs[slots])
        assert bool((mine[~torch.isin(torch.arange(len(mine)), slots)] == 0x7F).all())
    bk = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in kp]
    bv = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in vp]
    unpack_request(out, bk, bv, slots, fp8=None)
    for layer in range(LAYERS):
        real = dequantize_fp8(kp[layer][slots], dtype, fp8.k_scales[layer])
        assert torch.equal(bk[layer][slots], real.to(torch.bfloat16))


@pytest.mark.parametrize(
    "decode",
    [FP8Pool.of(E4M3, LAYERS, [0.5, 2.0, 1.0], 0.125), FP8Pool.of(E5M2, LAYERS)],
    ids=["e4m3-scaled", "e5m2"],
)
@pytest.mark.parametrize("budget", [0.3, 0.5, 1.0])
def test_asymmetric_bf16_prefill_fp8_decode(decode, budget):
    """Prefill bf16, decode FP8: the decode's pools get ``(x / scale)`` saturated to FP8
    of the reference's dequantised values, with the decode's own scales."""
    kp, vp, slots = make_pools(tokens=200, seed=4)
    cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales="channel")
    out = region(kp, slots, cfg)
    res = pack_request(kp, vp, slots, cfg, out=out)
    assert pool_pair_problem(torch.bfloat16, decode.dtype) is None
    pools = [torch.zeros(p.shape, dtype=torch.uint8) for p in kp]
    ok, _, _ = check_fp8_unpack(out, res.nbytes, res.checksum, pools, decode, slots)
    if budget == 1.0:  # lossless wire: the FP8 cast of the prefill's own values
        for layer in range(LAYERS):
            want = quantize_fp8(kp[layer][slots], decode.dtype, decode.k_scales[layer])
            assert torch.equal(ok[layer][slots], want)


def test_fp8_pools_across_formats_and_scales():
    """FP8 prefill -> FP8 decode of other scales, e4m3 -> e5m2, FP8 -> fp16/fp32."""
    fp8 = fp8_of(E4M3)
    kp, vp, slots = make_fp8_pools(fp8, tokens=120, seed=5)
    cfg = SpectrumConfig(budget=0.35, allow_drop=False, key_scales="channel")
    out = fp8_region(kp, slots, cfg, fp8)
    res = pack_request(kp, vp, slots, cfg, out=out, fp8=fp8)
    for dest in (FP8Pool.of(E4M3, LAYERS, 1.0, [2.0, 0.5, 1.0]), FP8Pool.of(E5M2, LAYERS, 3.0)):
        check_fp8_unpack(out, res.nbytes, res.checksum, kp, dest, slots)
    for dtype in (torch.float16, torch.float32):
        pools = [torch.zeros(p.shape, dtype=dtype) for p in kp]
        check_fp8_unpack(out, res.nbytes, res.checksum, pools, None, slots)


def test_fp8_round_trip_error_bounds():
    """Real values after FP8 pools -> wire -> FP8 pools: top tier exact, INT4 rows within
    half a quantisation step (+ fp16 rounding of scale and minimum), then one FP8
    rounding (relative 2**-4 for e4m3) of the receiver."""
    fp8 = fp8_of(E4M3)
    kp, vp, slots = make_fp8_pools(fp8, tokens=200, seed=6)
    cfg = SpectrumConfig(budget=0.3, allow_drop=False, group_size=16)
    out = fp8_region(kp, slots, cfg, fp8)
    res = pack_request(kp, vp, slots, cfg, out=out, fp8=fp8)
    header, _ = read_header(out[: res.nbytes])
    tiers = header_tier_map(header)
    ok, ov = fp8_empty(kp), fp8_empty(vp)
    unpack_request(out, ok, ov, slots, fp8=fp8)
    for layer in range(LAYERS):
        for src, got, key in ((kp, ok, True), (vp, ov, False)):
            s = fp8.scale(layer, key)
            x = dequantize_fp8(src[layer][slots], E4M3, s)
            y = dequantize_fp8(got[layer][slots], E4M3, s)
            top = tiers == int(Tier.FP16)
            assert torch.equal(x[top], y[top])
            g = x[~top].reshape(-1, 2, 2, 16)
            step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
            slack = 2.0**-10 * (g.abs().amax(-1, keepdim=True) + step) + 1e-6
            bound = (0.5 * step + slack).expand_as(g).reshape(-1, 2, 32)
            err = (x[~top] - y[~top]).abs()
            fp8_rounding = y[~top].abs() * 2.0**-3 + 2.0**-9 * s  # relative, subnormal
            assert bool((err <= bound + fp8_rounding).all())


def test_fp8_packed_size_bound():
    cfg = SpectrumConfig(budget=0.3, allow_drop=False, key_scales="channel")
    for t in (1, 5, 300, 4096):
        lay = config_layout(cfg, 4, 8, 128, E4M3, t)
        want = token_budget(lay, cfg) + fixed_overhead(lay)
        assert packed_size_bound(t, 4, 8, 128, E4M3, cfg) == want
        assert packed_size_bound(t, 4, 8, 128, "fp8_e4m3", cfg) == want  # SGLang's name
    half = SpectrumConfig(budget=0.5, allow_drop=False)
    lay = config_layout(half, 4, 8, 128, E5M2, 4096)
    assert packed_size_bound(4096, 4, 8, 128, E5M2, half) == lay.full_nbytes // 2 + (
        fixed_overhead(lay)
    )
    with pytest.raises(SpectrumConfigError, match="unsupported KV dtype"):
        packed_size_bound(5, 4, 8, 128, "float8_e4m3fnuz", cfg)


def test_pool_pair_problem():
    names = ["bfloat16", torch.float16, torch.float32, E4M3, "fp8_e5m2"]
    assert all(pool_pair_problem(a, b) is None for a in names for b in names)
    assert "decode's KV cache dtype float8_e4m3fnuz" in pool_pair_problem(E4M3, "float8_e4m3fnuz")
    assert "prefill" in pool_pair_problem(torch.uint8, E4M3)


def test_fp8_refusals_write_nothing():
    fp8 = fp8_of(E4M3)
    kp, vp, slots = make_fp8_pools(fp8, tokens=60, seed=7)
    cfg = SpectrumConfig(budget=0.35, allow_drop=False)
    out = fp8_region(kp, slots, cfg, fp8)
    with pytest.raises(SpectrumConfigError, match="fp8=FP8Pool"):
        pack_request(kp, vp, slots, cfg, out=out)  # uint8 pools need their meaning
    with pytest.raises(SpectrumConfigError, match="layers"):
        pack_request(kp, vp, slots, cfg, out=out, fp8=fp8_of(E4M3, LAYERS - 1))
    with pytest.raises(SpectrumConfigError, match="must be uint8 or float8_e4m3fn"):
        pack_request([k.view(E5M2) for k in kp], vp, slots, cfg, out=out, fp8=fp8)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e40, "x"):
        with pytest.raises(SpectrumConfigError):
            FP8Pool.of(E4M3, LAYERS, bad)
    with pytest.raises(SpectrumConfigError, match="FP8"):
        FP8Pool.of(torch.bfloat16, LAYERS)
    res = pack_request(kp, vp, slots, cfg, out=out, fp8=fp8)
    bad = out[: res.nbytes].clone()
    bad[-2] ^= 0x20
    cases = [
        (out, kp, None, SpectrumFormatError),  # FP8 pools without fp8
        (out, kp, fp8_of(E4M3, LAYERS - 1), SpectrumFormatError),
        (out, [torch.zeros(p.shape, dtype=torch.bfloat16) for p in kp], fp8, SpectrumFormatError),
        (bad, kp, fp8, SpectrumFormatError),  # corrupted payload
        (out, [p[:, :1].contiguous() for p in kp], fp8, SpectrumFormatError),  # other heads
    ]
    for buf, like, spec, error in cases:
        pk, pv = [torch.full_like(p, 0x11) for p in like], [torch.full_like(p, 0x11) for p in like]
        before = [p.clone() for p in pk + pv]
        with pytest.raises(error):
            unpack_request(buf, pk, pv, slots, fp8=spec)
        assert all(torch.equal(a, b) for a, b in zip(before, pk + pv))
    pk, pv = fp8_empty(kp), fp8_empty(vp)
    with pytest.raises(SpectrumFormatError, match="out of range"):
        unpack_request(out, pk, pv, slots + 10_000, fp8=fp8)
    assert all(bool((p == 0x7F).all()) for p in pk + pv)


@pytest.mark.parametrize("budget", [0.35, 0.5])
def test_fp8_request_in_parts_fits_the_parts_bound_and_round_trips(budget):
    """As test_request_in_parts_fits_the_parts_bound_and_round_trips, FP8 pools."""
    fp8 = fp8_of(E5M2)
    kp, vp, slots = make_fp8_pools(fp8, tokens=400, seed=8)
    cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales="channel")
    cuts = [0, 128, 256, 400]
    bound = packed_size_bound(400, LAYERS, 2, 32, fp8.dtype, cfg, parts=4)
    buf = torch.zeros(bound, dtype=torch.uint8)
    ok, ov = fp8_empty(kp), fp8_empty(vp)
    end, parts = 0, []
    for lo, hi in zip(cuts, cuts[1:]):
        part_cfg = cfg if hi == cuts[-1] else cfg.with_(window=0)
        out = fp8_region(kp, slots[lo:hi], part_cfg, fp8)
        ctx = slots[:lo] if lo else None
        res = pack_request(kp, vp, slots[lo:hi], part_cfg, out=out, context_slots=ctx, fp8=fp8)
        assert res.tier_counts["drop"] == 0 and res.nbytes <= out.numel()
        offset = part_offset(end)
        assert offset + res.nbytes <= bound
        buf[offset : offset + res.nbytes] = out[: res.nbytes]
        parts.append((offset, res.nbytes, res.checksum, lo, hi))
        end = offset + res.nbytes
    for offset, nbytes, checksum, lo, hi in parts:
        piece = buf[offset : offset + nbytes]
        unpack_request(piece, ok, ov, slots[lo:hi], expected_checksum=checksum, fp8=fp8)
    for mine, theirs in zip(ok + ov, kp + vp):
        assert not bool((mine[slots] == 0x7F).any())
        if budget == 0.5:  # lossless: the very bytes
            assert torch.equal(mine[slots], theirs[slots])


@pytest.mark.parametrize("budget", [0.35, 0.5])
def test_fp8_layer_groups_use_their_layers_scales(budget):
    """Layer-group parts of FP8 pools (``--spectrum-layer-group``): each group packs and
    unpacks with its own layers' scales (``FP8Pool.layers``); the first group's tier
    map serves the others; every layer ends as one whole pack with that map gives it
    (at 0.5, the very FP8 bytes)."""
    fp8 = fp8_of(E4M3)  # per-layer K scales 0.5, 1.0, 1.5
    assert fp8.layers(0, LAYERS) is fp8
    assert fp8.layers(1, 3).k_scales == fp8.k_scales[1:3]
    kp, vp, slots = make_fp8_pools(fp8, tokens=200, seed=9)
    cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales="channel")
    ok, ov = fp8_empty(kp), fp8_empty(vp)
    first = None
    for l0, l1 in ((0, 1), (1, 3)):
        sub = fp8.layers(l0, l1)
        out = fp8_region(kp[l0:l1], slots, cfg, sub)
        tiers = None if first is None else first.tier_map
        res = pack_request(kp[l0:l1], vp[l0:l1], slots, cfg, out=out, fp8=sub, tiers=tiers)
        first = first or res
        assert res.tier_counts == first.tier_counts and res.nbytes <= out.numel()
        unpack_request(out, ok[l0:l1], ov[l0:l1], slots, expected_checksum=res.checksum, fp8=sub)
    whole = fp8_region(kp, slots, cfg, fp8)
    res = pack_request(kp, vp, slots, cfg, out=whole, fp8=fp8, tiers=first.tier_map)
    wk, wv = fp8_empty(kp), fp8_empty(vp)
    unpack_request(whole, wk, wv, slots, expected_checksum=res.checksum, fp8=fp8)
    for mine, ref, theirs in zip(ok + ov, wk + wv, kp + vp):
        assert torch.equal(mine[slots], ref[slots])
        if budget == 0.5:
            assert torch.equal(mine[slots], theirs[slots])


# --------------------------------------------------------------------------- kernel path on CPU


FP8_KERNEL_CONFIGS = [
    SpectrumConfig(budget=0.35, allow_drop=False, key_scales="channel", key_block=8),
    SpectrumConfig(budget=0.5, allow_drop=False),
    SpectrumConfig(budget=0.3, allow_drop=False, tiers="2", group_size=8, sinks=2, window=4),
    SpectrumConfig(budget=0.4, allocator="optimal", allow_drop=False),
    SpectrumConfig(budget=0.2, method="int4", allow_drop=True),
]


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize(
    "config", FP8_KERNEL_CONFIGS, ids=lambda c: f"{c.method}-{c.allocator}-{c.budget}"
)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_fp8_kernel_path_matches_reference(config, dtype):
    """Kernel path from and into FP8 pools: the reference's bytes for its tier map, the
    FP8 scores of the fused key norms, the unpack of the torch path."""
    fp8 = fp8_of(dtype, 2)
    kp, vp, slots = make_fp8_pools(fp8, heads=2, head_dim=16, tokens=60, page=8)
    out = fp8_region(kp, slots, config, fp8)
    res = pack_request(kp, vp, slots, config, out=out, fp8=fp8)
    assert res.path == "kernels" and res.tier_counts["int8"] == 0
    header, payload = read_header(out[: res.nbytes])
    keys, values = [k[slots] for k in kp], [v[slots] for v in vp]
    again = pack_tiers(keys, values, header.layout, header_tier_map(header), header.policy)
    assert torch.equal(again.payload, payload)
    ref = pack_kv([k.view(dtype) for k in keys], [v.view(dtype) for v in values], config, fp8=fp8)
    assert res.tier_counts == ref.tier_counts
    assert float((header_tier_map(header) == ref.tiers).float().mean()) >= 0.9
    check_fp8_unpack(out, res.nbytes, res.checksum, kp, fp8, slots)


@pytest.mark.usefixtures("kernel_path")
def test_asymmetric_kernel_path():
    """bf16 pools packed by the kernels, unpacked by the kernels into FP8 pools."""
    kp, vp, slots = make_pools(layers=2, heads=2, head_dim=16, tokens=60, page=8)
    cfg = SpectrumConfig(budget=0.35, allow_drop=False, key_scales="channel", key_block=8)
    out = region(kp, slots, cfg)
    res = pack_request(kp, vp, slots, cfg, out=out)
    assert res.path == "kernels"
    pools = [torch.zeros(p.shape, dtype=torch.uint8) for p in kp]
    check_fp8_unpack(out, res.nbytes, res.checksum, pools, FP8Pool.of(E4M3, 2, 0.5, 2.0), slots)


def unpack_both_ways(monkeypatch, device: str, out, res, pools, fp8: FP8Pool | None, slots):
    """``check_fp8_unpack`` with the unpack kernel converting the FP8 source's top tier
    (``device`` in ``receive.FP8_CONVERSION_KERNEL_DEVICES``) and with the torch
    reference doing it (``device`` left out): the same bits. Returns whether the
    reference wrote, per way ``(kernel, reference)``."""
    real, wrote, outs = receive.iter_decoded_layers, [], []

    def spy(*args):
        wrote[-1] = True
        return real(*args)

    monkeypatch.setattr(receive, "iter_decoded_layers", spy)
    for devices in (frozenset({device}), frozenset()):
        monkeypatch.setattr(receive, "FP8_CONVERSION_KERNEL_DEVICES", devices)
        wrote.append(False)
        ok, ov, _ = check_fp8_unpack(out, res.nbytes, res.checksum, pools, fp8, slots)
        outs.append([p.view(torch.uint8) for p in ok + ov])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    return tuple(wrote)


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("decode", ["same", "other-scales", "e5m2", "bf16", "fp32"])
@pytest.mark.parametrize("source", [E4M3, torch.bfloat16], ids=["e4m3", "bf16"])
def test_fp8_conversion_gate(monkeypatch, source, decode):
    """unpack_request on a device not in ``FP8_CONVERSION_KERNEL_DEVICES`` (where the
    kernel's FP8-source conversion is not proven): an FP8 source's top tier stored
    another way goes through the torch reference, the byte copy (same dtype and scales)
    and 16-bit sources stay on the kernels; the bits are the same either way."""
    fp8 = fp8_of(E4M3)
    if source == E4M3:
        kp, vp, slots = make_fp8_pools(fp8, tokens=60, head_dim=16, page=8, seed=3)
        src = fp8
    else:
        kp, vp, slots = make_pools(head_dim=16, tokens=60, page=8, seed=3)
        src = None
    cfg = SpectrumConfig(budget=0.35, allow_drop=False, key_scales="channel", key_block=8)
    out = fp8_region(kp, slots, cfg, fp8) if src else region(kp, slots, cfg)
    res = pack_request(kp, vp, slots, cfg, out=out, fp8=src)
    assert res.path == "kernels" and res.tier_counts["fp16"] > 0
    dest = {
        "same": fp8,
        "other-scales": FP8Pool.of(E4M3, LAYERS, 1.0, [2.0, 0.5, 1.0]),
        "e5m2": FP8Pool.of(E5M2, LAYERS, 3.0),
    }.get(decode)
    if dest is not None:
        pools = [torch.zeros(p.shape, dtype=torch.uint8) for p in kp]
    else:
        dtype = torch.bfloat16 if decode == "bf16" else torch.float32
        pools = [torch.zeros(p.shape, dtype=dtype) for p in kp]
    header, _ = read_header(out[: res.nbytes])
    converts = source == E4M3 and decode != "same"
    assert receive.converts_fp8_source(header.layout, dest) == converts
    assert unpack_both_ways(monkeypatch, "cpu", out, res, pools, dest, slots) == (False, converts)


def check_conversion_kernel(monkeypatch, device: str, dtype, key_scales: str, **shape) -> None:
    """FP8 pools (rows of -0.0 bytes included) packed, then unpacked into FP8 pools of
    other scales, of the other FP8 dtype and into bf16/fp32 pools by the kernel (gate
    open) and by the torch reference (gate closed): both the CPU decode's
    values, the same bits."""
    fp8 = fp8_of(dtype, 4)
    kp, vp, slots = make_fp8_pools(fp8, device=device, seed=1, **shape)
    for p in kp + vp:  # signed zeros next to every kind of value
        p[slots[::7]] &= 0x80
    cfg = SpectrumConfig(budget=0.35, allow_drop=False, key_scales=key_scales)
    out = fp8_region(kp, slots, cfg, fp8)
    res = pack_request(kp, vp, slots, cfg, out=out, fp8=fp8)
    assert res.path == "kernels" and res.tier_counts["fp16"] > 0
    other = E5M2 if dtype == E4M3 else E4M3
    for dest in (FP8Pool.of(dtype, 4, 2.0), FP8Pool.of(other, 4, [1.0, 0.5, 2.0, 1.0], 0.25)):
        assert unpack_both_ways(monkeypatch, device, out, res, kp, dest, slots) == (False, True)
    for pool_dtype in (torch.bfloat16, torch.float32):
        pools = [torch.zeros(p.shape, dtype=pool_dtype, device=device) for p in kp]
        assert unpack_both_ways(monkeypatch, device, out, res, pools, None, slots) == (False, True)


@pytest.mark.parametrize("negation", ["neg", "0-x"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_fp8_conversion_kernel_equals_reference(request, monkeypatch, dtype, negation):
    """:func:`check_conversion_kernel` in the interpreter, also with float ``-x`` lowered
    as ``0.0 - x`` (the H200's Triton 3.6, where the kernel failed it)."""
    kern = request.getfixturevalue("kernel_path")
    if negation == "0-x" and (why := emulate_zero_minus_x(monkeypatch, kern._fp8.triton)):
        pytest.skip(why)
    check_conversion_kernel(monkeypatch, "cpu", dtype, "channel", head_dim=16, tokens=60, page=8)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("key_scales", ["token", "channel"])
@pytest.mark.parametrize("budget", [0.25, 0.3, 0.5])
def test_gpu_fp8_request_path_round_trip(dtype, key_scales, budget):
    """Kernel path on CUDA FP8 pools: the CPU reference's payload for the tier map, at
    most the bound and the budget (below 0.5), unpacked into FP8 pools of the same and
    of other scales, and into bf16 pools, as the CPU decode's values."""
    fp8 = fp8_of(dtype, 4)
    kp, vp, slots = make_fp8_pools(
        fp8, device="cuda", heads=8, head_dim=128, tokens=3000, page=64, seed=1
    )
    cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales=key_scales)
    out = fp8_region(kp, slots, cfg, fp8)
    res = pack_request(kp, vp, slots, cfg, out=out, fp8=fp8)
    assert res.path == "kernels" and res.tier_counts["drop"] == 0
    if budget >= 0.5:
        assert res.tier_counts["fp16"] == 3000
    elif budget >= 0.3:
        assert res.nbytes <= math.floor(budget * res.full_nbytes)
    header, payload = read_header(out[: res.nbytes])
    keys, values = [k[slots].cpu() for k in kp], [v[slots].cpu() for v in vp]
    ref = pack_tiers(keys, values, header.layout, header_tier_map(header), header.policy)
    assert torch.equal(ref.payload, payload.cpu())
    check_fp8_unpack(out, res.nbytes, res.checksum, kp, fp8, slots)
    check_fp8_unpack(out, res.nbytes, res.checksum, kp, FP8Pool.of(dtype, 4, 2.0), slots)
    bf = [torch.zeros(p.shape, dtype=torch.bfloat16, device="cuda") for p in kp]
    check_fp8_unpack(out, res.nbytes, res.checksum, bf, None, slots)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("key_scales", ["token", "channel"])
def test_gpu_fp8_conversion_kernel_equals_reference(monkeypatch, dtype, key_scales):
    """The proof ``receive.FP8_CONVERSION_KERNEL_DEVICES`` waits for (see
    :func:`check_conversion_kernel`), compiled at a serving shape."""
    shape = dict(heads=8, head_dim=128, tokens=3000, page=64)
    check_conversion_kernel(monkeypatch, "cuda", dtype, key_scales, **shape)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_gpu_asymmetric_bf16_prefill_fp8_decode(dtype, budget):
    kp, vp, slots = make_pools(
        layers=4, heads=8, head_dim=128, tokens=3000, page=64, device="cuda", seed=2
    )
    cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales="channel")
    out = region(kp, slots, cfg)
    res = pack_request(kp, vp, slots, cfg, out=out)
    assert res.path == "kernels"
    pools = [torch.zeros(p.shape, dtype=torch.uint8, device="cuda") for p in kp]
    decode = FP8Pool.of(dtype, 4, [0.5, 1.0, 2.0, 1.0], 0.25)
    check_fp8_unpack(out, res.nbytes, res.checksum, pools, decode, slots)
