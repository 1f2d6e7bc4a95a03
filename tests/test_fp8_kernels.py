"""Triton kernels with FP8 pools (SGLang ``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``)
against the torch codec: FP8 sources (uint8 pools of FP8 bits, per-layer scales), FP8
destinations (the receiver's scales), and the exact FP8 conversions the kernels use.

Without CUDA the kernels run in Triton's CPU interpreter on small shapes (see
``tests/test_kernels.py``); tests marked ``gpu`` run compiled on realistic shapes and
skip cleanly without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, emulate_zero_minus_x, same_bits
from test_kernels import (
    DEV,
    K,
    check_request,
    gpu_request,
    make_request,
    negative_zero_words,
    signed_zero_rows,
    stored,
    untouched,
)

from sglang_spectrum.codec import decode_kv, pack_tiers, unpack_kv
from sglang_spectrum.config import SpectrumConfigError
from sglang_spectrum.fp8 import FP8Pool, dequantize_fp8, quantize_fp8
from sglang_spectrum.policy import Tier
from sglang_spectrum.scoring import key_norm_scores

# triton as the kernels imported it: without CUDA its first import must happen under
# TRITON_INTERPRET=1 (conftest.import_kernels), so this module never imports it itself
triton, tl = K._fp8.triton, K._fp8.tl
to_fp8, from_fp8 = K._fp8.to_fp8, K._fp8.from_fp8  # interpreted or compiled, as K
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """Interpreted kernels read TRITON_INTERPRET while they run (see test_kernels)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["neg", "0-x"])
def negation(request, monkeypatch):
    """How float ``-x`` compiles: ``"neg"`` as this Triton does, ``"0-x"`` as ``0.0 - x``
    (:func:`conftest.emulate_zero_minus_x`), which made ``from_fp8`` decode byte 0x80
    (-0.0) as +0.0 on the H200. The kernels must not care."""
    if request.param == "0-x":
        why = emulate_zero_minus_x(monkeypatch, triton)
        if why:
            pytest.skip(why)
    return request.param


def _convert(src, bits, dec, back, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """(jitted in the test, under the interpreter without CUDA) both conversions."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(back + i, to_fp8(tl.load(src + i, mask=m), KIND), mask=m)
    tl.store(dec + i, from_fp8(tl.load(bits + i, mask=m), KIND), mask=m)


def _hard_values() -> torch.Tensor:
    """float32 values over every FP8 binade, out of range, fp32 subnormals, signed zeros,
    and every FP8 value, midpoint and its float32 neighbours (rounding ties)."""
    gen = torch.Generator().manual_seed(0)
    scales = (1e-6, 1e-4, 1e-2, 1.0, 30.0, 300.0, 1e4, 1e5, 1e9)
    parts = [torch.randn(2000, generator=gen) * s for s in scales]
    parts.append(torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38]))
    for dtype in (E4M3, E5M2):
        vals = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        vals = vals[torch.isfinite(vals)].sort().values
        mids = (vals[1:] + vals[:-1]) / 2
        up, down = torch.tensor(1e30), torch.tensor(-1e30)
        parts += [vals, mids, torch.nextafter(mids, up), torch.nextafter(mids, down)]
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_fp8_conversions_equal_torch(dtype, negation):
    """to_fp8 == x.clamp(-max, max).to(fp8) on every hard case; from_fp8 == the float
    torch's CPU cast gives for all 256 bit patterns, bit for bit (-0.0, inf, NaN
    payloads): the interpreter's own casts are wrong on subnormals, the kernels' bit
    arithmetic is not."""
    kernel = triton.jit(_convert)
    x = _hard_values().to(DEV)
    n = x.numel()
    bits = torch.arange(n, device=DEV).remainder(256).to(torch.uint8)
    back = torch.empty(n, dtype=torch.uint8, device=DEV)
    dec = torch.empty(n, device=DEV)
    kind = 1 if dtype == E4M3 else 2
    kernel[(triton.cdiv(n, 4096),)](x, bits, dec, back, n, KIND=kind, BLOCK=4096)
    top = torch.finfo(dtype).max
    assert torch.equal(back.cpu(), x.cpu().clamp(-top, top).to(dtype).view(torch.uint8))
    assert same_bits(dec.cpu(), bits.cpu().view(dtype).float())


def test_fp8_pool_conversion_helpers():
    """The reference conversions: saturation, scale 1.0 exact, same-scale round trip."""
    x = torch.tensor([1000.0, -1000.0, 0.3, 1e-9, 0.0])
    assert quantize_fp8(x, E4M3).view(E4M3).float().tolist()[:2] == [448.0, -448.0]
    assert quantize_fp8(x * 1e3, E5M2).view(E5M2).float().tolist()[:2] == [57344.0, -57344.0]
    bits = torch.arange(256, dtype=torch.uint8)
    finite = torch.isfinite(bits.view(E4M3).float())
    for s in (1.0, 0.37, 2.0**-30, 1e5):
        back = quantize_fp8(dequantize_fp8(bits, E4M3, s), E4M3, s)
        assert torch.equal(back[finite], bits[finite])


FP8_CASES = [
    dict(dtype=E4M3, head_dim=64, group=64, page=1),
    dict(dtype=E5M2, head_dim=64, group=16, page=16),
    dict(dtype=E4M3, head_dim=32, group=8, page=16, heads=3, layers=3),
    dict(dtype=E4M3, head_dim=64, group=64, page=16, key_block=16, tokens=70),
    dict(dtype=E5M2, head_dim=16, group=16, page=4, key_block=8, tokens=45, layers=3),
]


@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_fp8_source_byte_identical(case):
    """FP8 pools (uint8 bits, per-layer scales != 1): the pack kernel writes the
    reference's bytes (top tier = the pool's bytes, INT8/INT4 of the scaled values,
    per-channel keys included), both unpack into FP8 pools of the same format alike,
    and the key-norm kernel ranks the scaled keys."""
    req = make_request("cpu", **case)
    assert req.fp8 is not None and K.kernel_supported(req.layout)
    check_request(req)
    keys, _ = req.gathered()
    real = [dequantize_fp8(k, req.fp8.dtype, req.fp8.k_scales[i]) for i, k in enumerate(keys)]
    ref = key_norm_scores(real, req.layout.num_tokens)
    got = K.key_norm_scores_from_pools(
        req.k_pools, req.slots, req.layout.layer_first_pos, fp8=req.fp8
    )
    assert float((got - ref).abs().max()) <= 2.0 / req.layout.num_tokens + 1e-6


def test_fp8_top_tier_is_the_pools_bytes():
    """FP8 -> FP8 of the same dtype and scales: every top-tier row lands as the very
    bytes the source pool holds (the kernels copy; the reference's division gives the
    same bytes), INT4 rows as the FP8 of their dequantised values."""
    req = make_request("cpu", dtype=E4M3, head_dim=32, group=16, tokens=40, window=False)
    req.tiers[:] = torch.tensor([int(Tier.FP16), int(Tier.INT4)] * 20, dtype=torch.uint8)
    keys, values = req.gathered()
    buf = pack_tiers(keys, values, req.layout, req.tiers).to_tensor()
    top = req.tiers == int(Tier.FP16)
    for unpack in (K.unpack_to_pools, unpack_kv):
        kk, kv = req.empty_pools()
        unpack(buf, kk, kv, req.slots, fp8=req.fp8)
        for layer in range(req.layout.num_layers):
            assert torch.equal(kk[layer][req.slots[top]], req.k_pools[layer][req.slots[top]])
            assert torch.equal(kv[layer][req.slots[top]], req.v_pools[layer][req.slots[top]])


def check_unpack_into(req, fp8: FP8Pool | None = None, dtype=None) -> None:
    """Pack ``req`` with the reference, unpack it with the kernel into pools of another
    format (FP8 ``fp8`` with the receiver's scales, or ``dtype``) and, on CPU, with the
    reference too: every kept row equals the stored form of the CPU decode's float32
    values (``(x / scale)`` saturated to FP8, or ``x.to(dtype)``), dropped slots
    untouched."""
    keys, values = req.gathered()
    buf = pack_tiers(keys, values, req.layout, req.tiers).to_tensor(req.slots.device)
    kk, kv = req.empty_pools(fp8=fp8, dtype=dtype)
    K.unpack_to_pools(buf, kk, kv, req.slots, fp8=fp8)
    outs = [(kk, kv)]
    if not CUDA:
        rk, rv = req.empty_pools(fp8=fp8, dtype=dtype)
        unpack_kv(buf, rk, rv, req.slots, fp8=fp8)
        outs.append((rk, rv))
    dk, dv, kept = decode_kv(buf.cpu(), dtype=torch.float32)
    for layer, first in enumerate(req.layout.layer_first_pos):
        slots, live = req.slots[first:].cpu(), kept[first:]
        for pk, pv in outs:
            for pool, dec, key in ((pk, dk, True), (pv, dv, False)):
                out = pool[layer].cpu()[slots]
                want = stored(dec[layer], out, fp8, layer, key)
                assert same_bits(out[live], want[live]), (layer, key)
                assert untouched(out[~live], fp8)


CROSS = [  # (source pool dtype, FP8 destination pools, or a 16-bit destination dtype)
    (torch.bfloat16, FP8Pool.of(E4M3, 2, [0.5, 3.0], 2.0), None),  # prefill bf16, decode FP8
    (torch.float16, FP8Pool.of(E5M2, 2), None),
    (torch.float32, FP8Pool.of(E4M3, 2, 0.01), None),  # tiny scale: saturates outliers
    (E4M3, FP8Pool.of(E4M3, 2, [1.0, 0.5], [4.0, 1.0]), None),  # other scales: requantised
    (E4M3, FP8Pool.of(E5M2, 2), None),  # e4m3 -> e5m2
    (E5M2, None, torch.bfloat16),  # FP8 prefill, bf16 decode
    (E4M3, None, torch.float32),
]
CROSS_IDS = [
    "bf16-e4m3-scaled",
    "fp16-e5m2",
    "fp32-e4m3-saturating",
    "e4m3-e4m3-other-scales",
    "e4m3-e5m2",
    "e5m2-bf16",
    "e4m3-fp32",
]


@pytest.mark.parametrize("key_block", [0, 8])
@pytest.mark.parametrize("source,fp8,dtype", CROSS, ids=CROSS_IDS)
def test_unpack_across_pool_formats(source, fp8, dtype, key_block):
    req = make_request("cpu", dtype=source, head_dim=32, group=16, tokens=45, key_block=key_block)
    check_unpack_into(req, fp8, dtype)


def test_fp8_edge_values(negation):
    """Zeros, signed zeros, subnormals, the largest values and constant groups in FP8
    pools, at every tier: still the reference's bytes."""
    req = make_request("cpu", dtype=E5M2, head_dim=16, group=8, tokens=24, key_block=8, seed=3)
    for pools in (req.k_pools, req.v_pools):
        for p in pools:
            rows = req.slots
            p[rows[0]] = 0x00
            p[rows[1]] = 0x80  # -0
            p[rows[2]] = torch.randint(0, 4, p[rows[2]].shape, dtype=torch.uint8)  # subnormal
            p[rows[3], :, :8] = 0x7B  # 57344, the largest
            p[rows[4], :, 8:] = 0xFB  # -57344
            p[rows[5]] = 0x3C  # constant 1.0: scale 0
    req.tiers[:8] = torch.tensor([1, 2, 1, 2, 1, 2, 0, 0], dtype=torch.uint8)
    check_request(req)
    check_unpack_into(req, FP8Pool.of(E4M3, 2, 0.5))


FP8_SOURCES = [(c, i) for c, i in zip(CROSS, CROSS_IDS) if c[0] in (E4M3, E5M2)]


@pytest.mark.parametrize("key_block", [0, 8])
@pytest.mark.parametrize(
    "source,fp8,dtype", [c for c, _ in FP8_SOURCES], ids=[i for _, i in FP8_SOURCES]
)
def test_fp8_signed_zeros(source, fp8, dtype, key_block, negation):
    """FP8 sources holding 0x80 (-0.0) next to 0x00, in every tier (the H200 failures:
    compiled, 0x80 read as +0.0): the pack writes the reference's bytes with every zero
    scale word +0.0, the same-format unpack copies, and the unpack into other scales,
    another FP8 format or 16/32-bit pools keeps every zero's sign (the CPU decode's
    values, stored as those pools store them)."""
    req = make_request("cpu", dtype=source, head_dim=16, group=8, tokens=40, key_block=key_block)
    signed_zero_rows(req, fp8=True)
    for pools in (req.k_pools, req.v_pools):
        for p in pools:
            rows = req.slots
            p[rows[20]] = 0x80
            p[rows[21], :, ::2] = 0x80
            p[rows[22], :, 1::2] = 0x00
    req.tiers[20:24] = int(Tier.FP16)
    stats = check_request(req)
    assert stats["scale_words"] == 0 and stats["max_ulp"] == 0
    keys, values = req.gathered()
    ref = pack_tiers(keys, values, req.layout, req.tiers)
    got = K.pack_from_pools(req.k_pools, req.v_pools, req.slots, req.layout, req.tiers)
    assert negative_zero_words(got.payload, req.layout, req.tiers) == 0
    assert torch.equal(ref.payload, got.payload.cpu())
    check_unpack_into(req, fp8, dtype)


def test_fp8_with_hadamard_falls_back_to_the_reference():
    """Hadamard rotation is not fused with FP8: the kernel entry points hand such
    layouts to the torch codec (same bytes), the payload-level ones refuse."""
    req = make_request("cpu", dtype=E4M3, head_dim=16, group=8, tokens=30, rotation="hadamard")
    assert not K.kernel_supported(req.layout)
    check_request(req)
    bf = make_request("cpu", head_dim=16, group=8, tokens=30, rotation="hadamard")
    assert K.kernel_supported(bf.layout) and not K.kernel_supported(bf.layout, fp8_pools=True)
    check_unpack_into(bf, FP8Pool.of(E4M3, 2))
    plan = K.plan_transfer(bf.layout, bf.tiers, bf.slots)
    payload = K.pack_payload(bf.k_pools, bf.v_pools, plan)
    kk, kv = bf.empty_pools(fp8=FP8Pool.of(E4M3, 2))
    with pytest.raises(SpectrumConfigError, match="Hadamard"):
        K.unpack_payload(payload, kk, kv, plan, fp8=FP8Pool.of(E4M3, 2))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("key_block", [0, 64])
@pytest.mark.parametrize("tokens", [1, 777, 3000])
def test_gpu_fp8_source_byte_identical(dtype, key_block, tokens):
    """Compiled kernels on FP8 pools: byte-identical to the CPU reference (within 1 LSB
    of torch's CUDA reference, see test_gpu_pack_unpack_byte_identical); FP8 -> FP8
    unpack alike; key-norm ranks of the scaled keys."""
    req = gpu_request(tokens, dtype=dtype, key_block=key_block)
    stats = check_request(req, mode="cpu")
    print(f"GPU FP8 {dtype} kb={key_block} T={tokens} vs CUDA torch reference: {stats}")
    keys, _ = req.gathered()
    real = [dequantize_fp8(k, dtype, req.fp8.k_scales[i]) for i, k in enumerate(keys)]
    ref = key_norm_scores(real, req.layout.num_tokens)
    got = K.key_norm_scores_from_pools(
        req.k_pools, req.slots, req.layout.layer_first_pos, fp8=req.fp8
    )
    assert float((got - ref).abs().max()) <= 2.0 / max(tokens // 2, 1) + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("source,fp8,dtype", CROSS, ids=CROSS_IDS)
def test_gpu_unpack_across_pool_formats(source, fp8, dtype):
    """bf16 -> FP8 (the asymmetric deployment), FP8 -> FP8 of other scales or format,
    FP8 -> 16-bit, compiled: the CPU decode's values stored as the pools store them."""
    fp8 = fp8 and FP8Pool(fp8.dtype, fp8.k_scales * 2, fp8.v_scales * 2)  # 4 layers
    req = make_request(
        "cuda", layers=4, heads=8, head_dim=128, tokens=2000, dtype=source, key_block=64
    )
    if req.fp8 is not None:  # whole rows of signed zeros (0x80 read as +0.0 on the H200)
        for p in req.k_pools + req.v_pools:
            p[req.slots[::7]] &= 0x80
    check_unpack_into(req, fp8, dtype)
