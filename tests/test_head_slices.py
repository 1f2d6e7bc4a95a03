"""Heterogeneous attention TP in the request path: ``pack_request`` / ``pack_slices`` with
``heads=`` on every prefill rank's pools, ``unpack_request(heads=)`` into every decode rank's
pools, the ranks' head slices from ``sglang_spectrum.heads``.

A "global" KV of ``kv_heads`` heads is sharded as SGLang shards it (rank ``r`` of ``tp``
holds ``rank_heads(kv_heads, tp, r)``); each test moves it from ``p`` prefill ranks to
``d`` decode ranks and checks every decode pool against the global KV:

- ``b = 1.0`` (and FP8 pools at 0.5): each decode rank's heads are the global heads, bit
  for bit, every head written once, no other slot or head touched;
- below: each slice is the reference buffer of its heads,
  ``pack_kv(rank[slots, src], cfg, scores=score_tokens(rank[slots]))``: the tier map of
  the slice's head count allocated over the scores of every head of the sending prefill
  rank (``pack_slices``' choice), and the decode heads hold ``decode_kv`` of it.

CPU tests run the torch path and (``kernel_path``) the Triton kernels under the
interpreter; ``gpu`` twins run the kernel path on CUDA pools and skip without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CUDA, same_bits
from test_fp8_transfer import E4M3, E5M2, fp8_of, make_fp8_pools
from test_transfer import kernel_path, make_pools  # noqa: F401 (kernel_path: fixture)

from sglang_spectrum.codec import decode_kv, pack_kv, read_header
from sglang_spectrum.config import SpectrumConfig, SpectrumConfigError, SpectrumFormatError
from sglang_spectrum.fp8 import FP8Pool, dequantize_fp8, quantize_fp8
from sglang_spectrum.heads import decode_slices, prefill_slices, rank_heads
from sglang_spectrum.scoring import score_tokens
from sglang_spectrum.transfer import (
    pack_request,
    pack_slices,
    packed_size_bound,
    unpack_request,
)

NAN8 = 0x7F  # NaN in both FP8 formats


def shard(pools: list[torch.Tensor], kv_heads: int, tp: int, rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s pools ``[slots, H_rank, D]`` of global pools ``[slots, kv_heads, D]``."""
    g0, g1 = rank_heads(kv_heads, tp, rank)
    return [p[:, g0:g1].contiguous() for p in pools]


def empty_like_rank(like: torch.Tensor, heads: int, fp8: FP8Pool | None, dtype=None):
    """A decode pool ``[slots, heads, D]`` full of NaN (FP8: NaN bits)."""
    shape = (like.shape[0], heads, like.shape[2])
    if fp8 is not None:
        return torch.full(shape, NAN8, dtype=torch.uint8, device=like.device)
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


def move(kv_heads, p, d, kp, vp, slots, config, src_fp8=None, dst_fp8=None, dst_dtype=None):
    """Pack every prefill rank's slices (``pack_slices``) and unpack each into its decode
    rank's head range. Returns (decode K pools, decode V pools, records); pools per decode
    rank, records ``(slice, buffer, PackedRequest)``."""
    dtype = src_fp8.dtype if src_fp8 else kp[0].dtype
    hd = rank_heads(kv_heads, d, 0)[1] - rank_heads(kv_heads, d, 0)[0]
    dk = [[empty_like_rank(x, hd, dst_fp8, dst_dtype) for x in kp] for _ in range(d)]
    dv = [[empty_like_rank(x, hd, dst_fp8, dst_dtype) for x in vp] for _ in range(d)]
    records = []
    for q in range(p):
        pk, pv = shard(kp, kv_heads, p, q), shard(vp, kv_heads, p, q)
        slices = prefill_slices(kv_heads, p, q, d)
        outs = []
        for s in slices:
            n = packed_size_bound(
                slots.numel(), len(kp), s.num_heads, kp[0].shape[2], dtype, config
            )
            outs.append(torch.full((n,), 0xA5, dtype=torch.uint8, device=kp[0].device))
        if not slices:
            continue
        res = pack_slices(
            pk, pv, slots, config, outs=outs, heads=[s.src for s in slices], fp8=src_fp8
        )
        for s, out, r in zip(slices, outs, res):
            assert r.heads == s.src and r.nbytes <= out.numel()  # packed_size_bound of a slice
            assert r.full_nbytes == slots.numel() * len(kp) * 2 * s.num_heads * kp[0].shape[2] * 2
            records.append((s, out, r))
    for r in range(d):  # the decode's view: exactly decode_slices(r) arrive
        mine = [rec for rec in records if rec[0].decode_rank == r]
        assert [rec[0] for rec in mine] == decode_slices(kv_heads, p, d, r)
        for s, out, res in mine:
            info = unpack_request(
                out,
                dk[r],
                dv[r],
                slots,
                expected_checksum=res.checksum,
                fp8=dst_fp8,
                heads=s.dst,
            )
            assert info.tier_counts == res.tier_counts
    return dk, dv, records


def check_untouched(pools, slots, fp8):
    """Every head of every pool written at ``slots``, nothing anywhere else."""
    other = ~torch.isin(torch.arange(pools[0].shape[0], device=slots.device), slots)
    for x in pools:
        if fp8 is not None:
            assert not bool((x[slots] == NAN8).any()) and bool((x[other] == NAN8).all())
        else:
            assert not bool(torch.isnan(x[slots].float()).any())
            assert bool(torch.isnan(x[other].float()).all())


def check_lossless(kv_heads, d, kp, vp, dk, dv, slots):
    """Each decode rank's heads at ``slots`` are the global heads, bit for bit."""
    for r in range(d):
        want_k, want_v = shard(kp, kv_heads, d, r), shard(vp, kv_heads, d, r)
        for mine, want in zip(dk[r] + dv[r], want_k + want_v):
            assert same_bits(mine[slots], want[slots]), r


def reference_slice(kv_heads, p, kp, vp, slots, config, s, fp8=None):
    """The reference buffer of slice ``s``: ``pack_kv`` of its heads of the prefill rank's
    gathered KV, scored over every head of that rank."""
    pk, pv = shard(kp, kv_heads, p, s.prefill_rank), shard(vp, kv_heads, p, s.prefill_rank)
    keys = [k[slots] for k in pk]
    real = keys
    if fp8 is not None:
        real = [dequantize_fp8(k, fp8.dtype, fp8.k_scales[i]) for i, k in enumerate(keys)]
        keys = [k.view(fp8.dtype) for k in keys]
    scores = score_tokens(real, sinks=config.sinks, window=config.window)
    h = slice(*s.src)
    values = [v[slots][:, h] for v in pv]
    if fp8 is not None:
        values = [v.view(fp8.dtype) for v in values]
    return pack_kv([k[:, h] for k in keys], values, config, scores=scores, fp8=fp8)


def check_reference(kv_heads, p, kp, vp, slots, config, dk, dv, records, fp8=None, dst=None):
    """Every slice is its reference buffer, and its decode heads hold ``decode_kv`` of it
    (as the decode pools store it)."""
    for s, out, res in records:
        ref = reference_slice(kv_heads, p, kp, vp, slots, config, s, fp8)
        assert out[: res.nbytes].cpu().numpy().tobytes() == ref.to_bytes(), s
        keys, values, kept = decode_kv(ref.to_bytes(), dtype=torch.float32)
        for layer in range(len(kp)):
            for pools, dec, key in ((dk, keys, True), (dv, values, False)):
                got = pools[s.decode_rank][layer][slots][:, s.dst[0] : s.dst[1]].cpu()
                if dst is not None:
                    want = quantize_fp8(dec[layer], dst.dtype, dst.scale(layer, key))
                else:
                    want = dec[layer].to(got.dtype)
                assert same_bits(got[kept], want[kept]), (s, layer, key)


# (kv_heads, prefill TP, decode TP): p < d, p > d, both ways with kv_heads < TP
LAYOUTS = [(4, 1, 2), (4, 2, 1), (4, 2, 4), (2, 1, 4), (2, 4, 1), (2, 4, 2), (1, 2, 4)]
CONFIGS = [
    SpectrumConfig(budget=1.0, allow_drop=False, key_scales="channel", key_block=16),
    SpectrumConfig(budget=0.5, allow_drop=False, sinks=2, window=8),
    SpectrumConfig(budget=0.3, allow_drop=False, key_scales="channel", key_block=16),
    SpectrumConfig(budget=0.3, allow_drop=False, tiers="2", group_size=8),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.budget}-{c.key_scales}-{c.tiers}")
@pytest.mark.parametrize("kv_heads,p,d", LAYOUTS, ids=lambda x: str(x))
def test_round_trip_across_ranks(kv_heads, p, d, config):
    kp, vp, slots = make_pools(layers=2, heads=kv_heads, head_dim=16, tokens=120, seed=kv_heads)
    dk, dv, records = move(kv_heads, p, d, kp, vp, slots, config)
    for r in range(d):
        check_untouched(dk[r] + dv[r], slots, None)
    if config.budget == 1.0:
        check_lossless(kv_heads, d, kp, vp, dk, dv, slots)
    check_reference(kv_heads, p, kp, vp, slots, config, dk, dv, records)
    for s, out, res in records:  # (each within packed_size_bound of its heads: see move)
        # a slice packed alone: the very bytes (one tier map per head count)
        alone = torch.zeros_like(out)
        pk, pv = shard(kp, kv_heads, p, s.prefill_rank), shard(vp, kv_heads, p, s.prefill_rank)
        one = pack_request(pk, pv, slots, config, out=alone, heads=s.src)
        assert one.checksum == res.checksum and torch.equal(alone[: one.nbytes], out[: res.nbytes])


def test_p1_slices_of_the_whole_pool_equal_the_single_rank_buffer():
    """p = 1 -> d = 1 through pack_slices(heads=[(0, H)]) / unpack_request(heads=(0, H)) is
    the plain single-rank transfer: the same bytes and pools."""
    kp, vp, slots = make_pools(layers=2, heads=4, head_dim=16, tokens=100, seed=1)
    cfg = SpectrumConfig(budget=0.4, allow_drop=False, key_scales="channel", key_block=16)
    n = packed_size_bound(100, 2, 4, 16, torch.bfloat16, cfg)
    a, b = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    plain = pack_request(kp, vp, slots, cfg, out=a)
    (sliced,) = pack_slices(kp, vp, slots, cfg, outs=[b], heads=[(0, 4)])
    assert plain.heads is None and sliced.heads == (0, 4)
    assert torch.equal(a[: plain.nbytes], b[: sliced.nbytes])
    x = [torch.zeros_like(p) for p in kp + vp]
    y = [torch.zeros_like(p) for p in kp + vp]
    unpack_request(a, x[:2], x[2:], slots)
    unpack_request(b, y[:2], y[2:], slots, heads=(0, 4))
    assert all(torch.equal(i, j) for i, j in zip(x, y))


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("budget", [0.5, 0.35])
@pytest.mark.parametrize("kv_heads,p,d", [(4, 1, 2), (4, 2, 1), (2, 4, 2)], ids=lambda x: str(x))
def test_fp8_pools_across_ranks(kv_heads, p, d, budget, dtype):
    """FP8 prefill and decode pools (same format and scales): b=0.5 moves the FP8 bytes
    themselves; b=0.35 (FP8 + INT4) gives each slice its reference buffer."""
    fp8 = fp8_of(dtype, 2)
    kp, vp, slots = make_fp8_pools(fp8, heads=kv_heads, head_dim=16, tokens=120, seed=3)
    cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales="channel", key_block=16)
    dk, dv, records = move(kv_heads, p, d, kp, vp, slots, cfg, src_fp8=fp8, dst_fp8=fp8)
    for r in range(d):
        check_untouched(dk[r] + dv[r], slots, fp8)
    if budget == 0.5:
        assert all(res.tier_counts["fp16"] == 120 for _, _, res in records)
        check_lossless(kv_heads, d, kp, vp, dk, dv, slots)
    check_reference(kv_heads, p, kp, vp, slots, cfg, dk, dv, records, fp8=fp8, dst=fp8)


def test_bf16_prefill_to_fp8_decode_across_ranks():
    """bf16 prefill TP 1 -> FP8 decode TP 2 (the decode's own scales), lossless wire."""
    kp, vp, slots = make_pools(layers=2, heads=4, head_dim=16, tokens=80, seed=4)
    cfg = SpectrumConfig(budget=1.0, allow_drop=False)
    dst = FP8Pool.of(E4M3, 2, [0.5, 2.0], 0.25)
    dk, dv, records = move(4, 1, 2, kp, vp, slots, cfg, dst_fp8=dst)
    check_reference(4, 1, kp, vp, slots, cfg, dk, dv, records, dst=dst)
    for r in range(2):
        for layer in range(2):
            want = quantize_fp8(shard(kp, 4, 2, r)[layer][slots], E4M3, dst.k_scales[layer])
            assert torch.equal(dk[r][layer][slots], want)


def test_refusals_write_nothing():
    kp, vp, slots = make_pools(layers=2, heads=4, head_dim=16, tokens=60, seed=5)
    cfg = SpectrumConfig(budget=0.5, allow_drop=False)
    n2 = packed_size_bound(60, 2, 2, 16, torch.bfloat16, cfg)
    for bad in ((3, 5), (-1, 1), (2, 2), (1, 0), "x", (0, 1, 2)):
        out = torch.full((4 * n2,), 0xA5, dtype=torch.uint8)
        with pytest.raises(SpectrumConfigError, match="head"):
            pack_request(kp, vp, slots, cfg, out=out, heads=bad)
        assert bool((out == 0xA5).all())
    with pytest.raises(SpectrumConfigError, match="packed_size_bound"):  # the slice's bound
        pack_request(kp, vp, slots, cfg, out=torch.zeros(n2 - 1, dtype=torch.uint8), heads=(0, 2))
    with pytest.raises(SpectrumConfigError, match="outs"):
        pack_slices(kp, vp, slots, cfg, outs=[torch.zeros(n2, dtype=torch.uint8)], heads=[])
    out = torch.zeros(n2, dtype=torch.uint8)
    res = pack_request(kp, vp, slots, cfg, out=out, heads=(2, 4))
    assert read_header(out[: res.nbytes])[0].layout.num_kv_heads == 2
    cases = [  # (decode pool heads, head range, error)
        (4, (3, 5), "out of bounds"),
        (4, (-1, 1), "out of bounds"),
        (2, (1, 1), "out of bounds"),
        (4, (0, 1), "KV heads"),  # the header's 2 heads into 1
        (4, (1, 4), "KV heads"),  # ... into 3
        (4, None, "KV heads"),  # ... into every head of 4
        (1, None, "KV heads"),
    ]
    for heads, rng, match in cases:
        pools = [torch.full((kp[0].shape[0], heads, 16), 1.0) for _ in range(4)]
        with pytest.raises(SpectrumFormatError, match=match):
            unpack_request(out, pools[:2], pools[2:], slots, heads=rng)
        assert all(bool((x == 1.0).all()) for x in pools)
    pools = [torch.full((kp[0].shape[0], 4, 16), 1.0, dtype=torch.bfloat16) for _ in range(4)]
    unpack_request(out, pools[:2], pools[2:], slots, heads=(1, 3), expected_checksum=res.checksum)
    assert all(bool((x[:, [0, 3]] == 1.0).all()) for x in pools)  # the other heads untouched
    assert all(not bool((x[slots, 1:3] == 1.0).all()) for x in pools)


# --------------------------------------------------------------------------- kernel path on CPU


def distinct_norms(pools: list[torch.Tensor], seed: int = 0) -> None:
    """Scale each slot's keys by its own factor: key norms far apart, so the kernels' fused
    norms rank exactly as the reference (no near ties)."""
    gen = torch.Generator().manual_seed(seed)
    for p in pools:
        f = torch.linspace(0.5, 4.0, p.shape[0])[torch.randperm(p.shape[0], generator=gen)]
        p.copy_((p.float() * f[:, None, None]).to(p.dtype))


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: f"{c.budget}-{c.key_scales}")
@pytest.mark.parametrize("kv_heads,p,d", [(4, 1, 2), (4, 2, 1), (2, 1, 4)], ids=lambda x: str(x))
def test_kernel_path_across_ranks(kv_heads, p, d, config):
    """The Triton path (interpreter) over head ranges: the torch path's bytes (key norms
    without near ties) and the same decode pools."""
    kp, vp, slots = make_pools(layers=2, heads=kv_heads, head_dim=16, tokens=64, page=8, seed=6)
    distinct_norms(kp)
    dk, dv, records = move(kv_heads, p, d, kp, vp, slots, config)
    assert all(res.path == "kernels" for _, _, res in records)
    for r in range(d):
        check_untouched(dk[r] + dv[r], slots, None)
    if config.budget == 1.0:
        check_lossless(kv_heads, d, kp, vp, dk, dv, slots)
    check_reference(kv_heads, p, kp, vp, slots, config, dk, dv, records)


@pytest.mark.usefixtures("kernel_path")
def test_kernel_path_fp8_across_ranks():
    fp8 = fp8_of(E4M3, 2)
    kp, vp, slots = make_fp8_pools(fp8, heads=4, head_dim=16, tokens=64, page=8, seed=7)
    real = [dequantize_fp8(k, E4M3, fp8.k_scales[i]) for i, k in enumerate(kp)]
    distinct_norms(real)
    kp = [quantize_fp8(x, E4M3, fp8.k_scales[i]) for i, x in enumerate(real)]
    cfg = SpectrumConfig(budget=0.35, allow_drop=False, key_scales="channel", key_block=8)
    dk, dv, records = move(4, 2, 1, kp, vp, slots, cfg, src_fp8=fp8, dst_fp8=fp8)
    assert all(res.path == "kernels" for _, _, res in records)
    check_untouched(dk[0] + dv[0], slots, fp8)
    check_reference(4, 2, kp, vp, slots, cfg, dk, dv, records, fp8=fp8, dst=fp8)


@pytest.mark.usefixtures("kernel_path")
def test_kernel_path_refusals_write_nothing():
    kp, vp, slots = make_pools(layers=2, heads=4, head_dim=16, tokens=40, page=8)
    cfg = SpectrumConfig(budget=0.5, allow_drop=False, key_scales="channel", key_block=8)
    out = torch.zeros(packed_size_bound(40, 2, 2, 16, torch.bfloat16, cfg), dtype=torch.uint8)
    res = pack_request(kp, vp, slots, cfg, out=out, heads=(1, 3))
    assert res.path == "kernels"
    for rng in ((0, 1), (3, 5), None):
        pools = [torch.full_like(kp[0], 1.0) for _ in range(4)]
        with pytest.raises(SpectrumFormatError):
            unpack_request(out, pools[:2], pools[2:], slots, heads=rng)
        assert all(bool((x == 1.0).all()) for x in pools)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("budget", [1.0, 0.5])
@pytest.mark.parametrize("key_scales", ["token", "channel"])
@pytest.mark.parametrize(
    "kv_heads,p,d", [(8, 1, 2), (8, 2, 1), (8, 2, 4), (8, 4, 2), (2, 1, 4), (2, 4, 1)]
)
def test_gpu_round_trip_across_ranks(kv_heads, p, d, key_scales, budget):
    """Kernel path on CUDA pools (Llama-3-8B head_dim): every slice is the CPU reference's
    payload for its tier map, each slice within its budget, the decode pools its
    decode (b=1.0: the global KV bit for bit), every head once, nothing else touched."""
    from sglang_spectrum.codec import header_tier_map, pack_tiers

    kp, vp, slots = make_pools(
        layers=4, heads=kv_heads, head_dim=128, tokens=3000, page=64, device="cuda", seed=p + d
    )
    cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales=key_scales)
    dk, dv, records = move(kv_heads, p, d, kp, vp, slots, cfg)
    for r in range(d):
        check_untouched(dk[r] + dv[r], slots, None)
    if budget == 1.0:
        check_lossless(kv_heads, d, kp, vp, dk, dv, slots)
    for s, out, res in records:
        assert res.path == "kernels" and res.tier_counts["drop"] == 0
        if budget < 1.0:
            assert res.nbytes <= math.floor(budget * res.full_nbytes)
        header, payload = read_header(out[: res.nbytes])
        pk = shard(kp, kv_heads, p, s.prefill_rank)
        pv = shard(vp, kv_heads, p, s.prefill_rank)
        h = slice(*s.src)
        keys = [k[slots][:, h].cpu() for k in pk]
        values = [v[slots][:, h].cpu() for v in pv]
        tiers = header_tier_map(header)
        ref = pack_tiers(keys, values, header.layout, tiers, header.policy)
        assert torch.equal(ref.payload, payload.cpu())
        dec_k, dec_v, kept = decode_kv(out[: res.nbytes])
        for layer in range(4):
            got_k = dk[s.decode_rank][layer][slots][:, s.dst[0] : s.dst[1]]
            got_v = dv[s.decode_rank][layer][slots][:, s.dst[0] : s.dst[1]]
            assert same_bits(got_k, dec_k[layer]) and same_bits(got_v, dec_v[layer])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_gpu_fp8_across_ranks(dtype):
    """FP8 pools on CUDA, prefill TP 2 -> decode TP 1 and TP 1 -> TP 2: b=0.5 moves the
    FP8 bytes (bit for bit), b=0.3 each slice within its budget and unpacked as decoded."""
    fp8 = fp8_of(dtype, 4)
    kp, vp, slots = make_fp8_pools(
        fp8, device="cuda", heads=8, head_dim=128, tokens=3000, page=64, seed=9
    )
    for p, d in ((2, 1), (1, 2)):
        for budget in (0.5, 0.3):
            cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales="channel")
            dk, dv, records = move(8, p, d, kp, vp, slots, cfg, src_fp8=fp8, dst_fp8=fp8)
            for r in range(d):
                check_untouched(dk[r] + dv[r], slots, fp8)
            if budget == 0.5:
                check_lossless(8, d, kp, vp, dk, dv, slots)
            for s, out, res in records:
                assert res.path == "kernels"
                if budget < 0.5:
                    assert res.nbytes <= math.floor(budget * res.full_nbytes)
                keys, _, kept = decode_kv(out[: res.nbytes].cpu(), dtype=torch.float32)
                for layer in range(4):
                    got = dk[s.decode_rank][layer][slots][:, s.dst[0] : s.dst[1]].cpu()
                    want = quantize_fp8(keys[layer], dtype, fp8.k_scales[layer])
                    assert torch.equal(got[kept], want[kept])


def test_head_slices_benchmark_smoke(tmp_path):
    """bench/head_slices.py (the measurement behind pack_slices' choice) runs, tiny shapes:
    a shared tier map costs the bytes of per-slice allocations."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "head_slices.py"
    spec = importlib.util.spec_from_file_location("head_slices_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "hs.json"
    args = ["--tokens", "64", "--layers", "2", "--kv-heads", "4", "--head-dim", "16"]
    bench.main(
        [*args, "--decode-tp", "1,2,4", "--budgets", "0.5", "--reps", "1", "--out", str(out)]
    )
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 2 * 3 and all(r["a_bytes"] == r["b_bytes"] for r in recs)
    assert all(r["slices"] == r["decode_tp"] for r in recs)
