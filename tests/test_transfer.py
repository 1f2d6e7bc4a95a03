"""The request path (``sglang_spectrum.transfer``): pack_request / unpack_request.

CPU tests run the torch path on real tensors against the codec reference
(``pack_kv`` bytes, ``decode_kv`` rows). Tests marked ``gpu`` run the kernel path
on CUDA pools and skip cleanly without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, import_kernels, paged_slots, same_bits

from sglang_spectrum.codec import (
    config_layout,
    decode_kv,
    fixed_overhead,
    pack_kv,
    read_header,
    token_budget,
)
from sglang_spectrum.config import SpectrumConfig, SpectrumConfigError, SpectrumFormatError
from sglang_spectrum.policy import allocate_tiers
from sglang_spectrum.scoring import score_tokens
from sglang_spectrum.transfer import (
    ChunkTiers,
    PackedRequest,
    pack_request,
    pack_slices,
    packed_size_bound,
    unpack_request,
)


def make_pools(
    layers=3,
    heads=2,
    head_dim=32,
    tokens=150,
    page=16,
    dtype=torch.bfloat16,
    device="cpu",
    seed=0,
    spare_pages=3,
):
    """Paged pools with shuffled pages; KV with per-channel scales and outliers.

    Returns (k_pools, v_pools, slots int64 [tokens])."""
    gen = torch.Generator().manual_seed(seed)
    slots, num_slots = paged_slots(tokens, page, spare_pages, gen)

    def pool(scale):
        chan = torch.exp(torch.randn(heads, head_dim, generator=gen))
        mag = torch.rand(num_slots, 1, 1, generator=gen) * 3 + 0.1
        x = torch.randn(num_slots, heads, head_dim, generator=gen) * chan * mag * scale
        x[torch.rand(x.shape, generator=gen) < 1e-3] *= 30.0
        return x.to(dtype).to(device)

    return (
        [pool(2.0) for _ in range(layers)],
        [pool(1.0) for _ in range(layers)],
        slots.to(device),
    )


def region(k_pools, slots, config, extra=0):
    """A send region of exactly packed_size_bound (+ extra) bytes, filled with junk."""
    _, heads, head_dim = k_pools[0].shape
    n = packed_size_bound(slots.numel(), len(k_pools), heads, head_dim, k_pools[0].dtype, config)
    return torch.full((n + extra,), 0xA5, dtype=torch.uint8, device=k_pools[0].device)


def unpack_vs_decode(out, res, k_pools, v_pools, slots):
    """``decode_kv`` of the packed bytes and ``unpack_request`` of ``out`` into NaN-filled
    pools shaped like ``k_pools, v_pools`` at ``slots`` (tier counts checked):
    (keys, values, kept, k pools, v pools, unpack info)."""
    dk, dv, kept = decode_kv(out[: res.nbytes])
    ok = [torch.full_like(p, float("nan")) for p in k_pools]
    ov = [torch.full_like(p, float("nan")) for p in v_pools]
    info = unpack_request(out, ok, ov, slots, expected_checksum=res.checksum)
    assert info.tier_counts == res.tier_counts
    return dk, dv, kept, ok, ov, info


CONFIGS = [
    SpectrumConfig(budget=0.5, allow_drop=False),
    SpectrumConfig(budget=0.3, allow_drop=False, key_scales="channel"),
    SpectrumConfig(budget=0.3, allow_drop=False, tiers="2", group_size=16),
    SpectrumConfig(budget=0.4, allocator="optimal", allow_drop=False),
    SpectrumConfig(budget=0.25, method="int4", allow_drop=True),
    SpectrumConfig(budget=0.2, method="snapkv", allow_drop=True),
    SpectrumConfig(budget=1.0, allow_drop=False, key_scales="channel", key_block=16),
    SpectrumConfig(budget=0.5, rotation="hadamard", group_size=16, allow_drop=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.budget}-{c.key_scales}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pack_matches_pack_kv_and_round_trips(config, dtype):
    kp, vp, slots = make_pools(dtype=dtype, seed=hash(config) % 1000)
    out = region(kp, slots, config, extra=100)
    before = out.clone()
    res = pack_request(kp, vp, slots, config, out=out)
    assert isinstance(res, PackedRequest) and res.path == "torch"
    keys, values = [k[slots] for k in kp], [v[slots] for v in vp]
    ref = pack_kv(keys, values, config)
    assert res.nbytes == ref.nbytes and res.checksum == ref.header.checksum
    assert out[: res.nbytes].numpy().tobytes() == ref.to_bytes()
    assert torch.equal(out[res.nbytes :], before[res.nbytes :]), "wrote past nbytes"
    assert res.num_tokens == slots.numel() and res.full_nbytes == ref.full_nbytes
    assert res.tier_counts == ref.tier_counts
    assert sum(res.tier_counts.values()) == slots.numel()
    if not config.allow_drop:
        assert res.tier_counts["drop"] == 0
    assert res.nbytes <= packed_size_bound(
        slots.numel(), len(kp), kp[0].shape[1], kp[0].shape[2], dtype, config
    )
    assert set(res.timings_ms) >= {"plan", "pack", "total"}

    # unpack into other pools at other slots: the decoded rows, bit for bit
    pk, pv, dst = make_pools(dtype=dtype, seed=7, tokens=slots.numel(), spare_pages=5)
    dk, dv, kept, ok, ov, info = unpack_vs_decode(out, res, pk, pv, dst)
    assert info.num_tokens == slots.numel()
    assert torch.equal(info.dropped, torch.nonzero(~kept).flatten())
    for layer in range(len(kp)):
        for pools, dec in ((ok, dk), (ov, dv)):
            got = pools[layer][dst]
            assert same_bits(got[kept], dec[layer][kept].to(dtype))
            assert torch.isnan(got[~kept].float()).all()


def test_packed_size_bound_is_the_codec_bound_and_cached():
    cfg = SpectrumConfig(budget=0.3, allow_drop=False, key_scales="channel")
    for t in (1, 5, 300, 4096):
        lay = config_layout(cfg, 4, 8, 128, torch.bfloat16, t)
        want = token_budget(lay, cfg) + fixed_overhead(lay)
        assert packed_size_bound(t, 4, 8, 128, torch.bfloat16, cfg) == want
        assert packed_size_bound(t, 4, 8, 128, "bfloat16", cfg) == want
    # allow_drop=True configs are bounded as serving packs them (no drop)
    loose = cfg.with_(allow_drop=True)
    assert packed_size_bound(5, 4, 8, 128, "bfloat16", loose) == packed_size_bound(
        5, 4, 8, 128, "bfloat16", cfg
    )


def test_short_prompts_never_drop_and_fit_the_bound():
    for tokens in (1, 2, 5, 40):
        kp, vp, slots = make_pools(tokens=tokens, seed=tokens)
        cfg = SpectrumConfig(budget=0.25, allow_drop=False, key_scales="channel")
        out = region(kp, slots, cfg)
        res = pack_request(kp, vp, slots, cfg, out=out)
        assert res.tier_counts["drop"] == 0 and res.nbytes <= out.numel()


def test_context_slots_score_the_whole_prompt_but_pack_the_rest():
    kp, vp, slots = make_pools(tokens=200, seed=3)
    ctx, sent = slots[:70], slots[70:]
    cfg = SpectrumConfig(budget=0.3, allow_drop=False, sinks=4, window=16)
    out = region(kp, sent, cfg)
    res = pack_request(kp, vp, sent, cfg, out=out, context_slots=ctx)
    header, _ = read_header(out[: res.nbytes])
    assert header.layout.num_tokens == 130
    # reference: score all 200 positions, allocate the last 130, no sinks among them
    scores = score_tokens([k[slots] for k in kp], sinks=4, window=16)[70:]
    lay = config_layout(cfg, 3, 2, 32, torch.bfloat16, 130)
    sent_cfg = cfg.with_(sinks=0)
    want = allocate_tiers(scores, lay.token_costs(), token_budget(lay, sent_cfg), sent_cfg)
    got = torch.frombuffer(bytearray(header.tier_map), dtype=torch.uint8)
    assert torch.equal(got, want)
    assert res.tier_counts["drop"] == 0
    # the sent positions differ from packing them alone (their own sinks, scores)
    alone = pack_request(kp, vp, sent, cfg, out=torch.zeros_like(out))
    assert alone.tier_counts != res.tier_counts or alone.checksum != res.checksum
    # a context shorter than the sinks leaves the rest of the sinks among the sent
    out = region(kp, slots[2:], cfg)
    res2 = pack_request(kp, vp, slots[2:], cfg, out=out, context_slots=slots[:2])
    header2, _ = read_header(out[: res2.nbytes])
    assert bytes(header2.tier_map[:2]) == b"\x00\x00"
    # round trip of the sent part
    ok = [torch.zeros_like(p) for p in kp]
    ov = [torch.zeros_like(p) for p in vp]
    unpack_request(out, ok, ov, slots[2:])
    dk, _, _ = decode_kv(out[: res2.nbytes])
    assert same_bits(ok[1][slots[2:]], dk[1])


def test_out_too_small_and_bad_inputs():
    kp, vp, slots = make_pools()
    cfg = SpectrumConfig(budget=0.5, allow_drop=False)
    out = region(kp, slots, cfg)
    with pytest.raises(SpectrumConfigError, match="packed_size_bound"):
        pack_request(kp, vp, slots, cfg, out=out[:-1])
    with pytest.raises(SpectrumConfigError):
        pack_request(kp, vp, slots, cfg, out=out.view(torch.int8))
    with pytest.raises(SpectrumConfigError, match="out of range"):
        pack_request(kp, vp, slots + 10_000, cfg, out=out)
    with pytest.raises(SpectrumConfigError):
        pack_request(kp, vp, slots.float(), cfg, out=out)
    with pytest.raises(SpectrumConfigError):
        pack_request(kp, vp[:-1], slots, cfg, out=out)
    with pytest.raises(SpectrumConfigError):
        pack_request(kp, [v.half() for v in vp], slots, cfg, out=out)
    with pytest.raises(SpectrumConfigError):
        pack_request(kp, vp, slots[:0], cfg, out=out)


def test_unpack_errors_write_nothing():
    kp, vp, slots = make_pools(tokens=100)
    cfg = SpectrumConfig(budget=0.5, allow_drop=False, key_scales="channel")
    out = region(kp, slots, cfg)
    res = pack_request(kp, vp, slots, cfg, out=out)
    good = out[: res.nbytes].clone()
    corrupt_payload = good.clone()
    corrupt_payload[-5] ^= 0x10
    corrupt_header = good.clone()
    corrupt_header[40] ^= 0x01
    bad_magic = good.clone()
    bad_magic[0] = 0
    other_heads = [torch.zeros(p.shape[0], 4, p.shape[2], dtype=p.dtype) for p in kp]
    cases = [
        (corrupt_payload, kp, vp, slots, None),
        (corrupt_header, kp, vp, slots, None),
        (bad_magic, kp, vp, slots, None),
        (good[: res.nbytes - 1], kp, vp, slots, None),
        (good[:10], kp, vp, slots, None),
        (good, kp, vp, slots[:-1], None),
        (good, kp, vp, slots + 100_000, None),
        (good, kp, vp, slots, res.checksum ^ 1),
        (good, kp[:2], vp[:2], slots, None),
        (good, other_heads, other_heads, slots, None),
    ]
    for buf, kk, vv, ss, expected in cases:
        pools_k = [torch.full_like(p, 1.0) for p in kk]
        pools_v = [torch.full_like(p, 1.0) for p in vv]
        with pytest.raises(SpectrumFormatError):
            unpack_request(buf, pools_k, pools_v, ss, expected_checksum=expected)
        assert all(bool((p == 1.0).all()) for p in pools_k + pools_v)
    # the good buffer still unpacks
    pools_k = [torch.zeros_like(p) for p in kp]
    pools_v = [torch.zeros_like(p) for p in vp]
    unpack_request(good, pools_k, pools_v, slots, expected_checksum=res.checksum)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("key_scales", ["token", "channel"])
@pytest.mark.parametrize("tokens", [1, 333, 4096])
def test_gpu_request_path_round_trip(key_scales, tokens):
    """Kernel path: the packed buffer reads back with the reference reader, unpacks
    bit-identically to ``decode_kv`` and equals the reference pack of its tier map."""
    from sglang_spectrum.codec import PackedKV, header_tier_map, pack_tiers

    kp, vp, slots = make_pools(
        layers=4, heads=8, head_dim=128, tokens=tokens, page=64, device="cuda", seed=tokens
    )
    cfg = SpectrumConfig(budget=0.3, allow_drop=False, key_scales=key_scales)
    out = region(kp, slots, cfg)
    res = pack_request(kp, vp, slots, cfg, out=out)
    assert res.path == "kernels" and res.tier_counts["drop"] == 0
    header, payload = read_header(out[: res.nbytes])
    assert header.checksum == res.checksum
    # same bytes as the CPU reference packing the same tier map
    keys = [k[slots].cpu() for k in kp]
    values = [v[slots].cpu() for v in vp]
    ref = pack_tiers(keys, values, header.layout, header_tier_map(header), header.policy)
    assert isinstance(ref, PackedKV)
    assert torch.equal(ref.payload, payload.cpu())
    dk, dv, kept, ok, ov, _ = unpack_vs_decode(out, res, kp, vp, slots)
    for layer in range(4):
        assert same_bits(ok[layer][slots], dk[layer])
        assert same_bits(ov[layer][slots], dv[layer])


# --------------------------------------------------------------------------- kernel path on CPU


@pytest.fixture
def kernel_path(monkeypatch):
    """Run pack_request / unpack_request's kernel path on CPU pools (interpreter)."""
    import sglang_spectrum
    from sglang_spectrum import pools

    kern = import_kernels()
    monkeypatch.setattr(sglang_spectrum, "kernels", kern, raising=False)
    monkeypatch.setattr(pools, "_KERNELS_ON_CPU", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return kern


KERNEL_CONFIGS = [
    SpectrumConfig(budget=0.5, allow_drop=False),
    SpectrumConfig(budget=0.3, allow_drop=False, key_scales="channel", key_block=8),
    SpectrumConfig(budget=0.3, allow_drop=False, tiers="2", group_size=8, sinks=2, window=4),
    SpectrumConfig(budget=0.4, allocator="optimal", allow_drop=False),
    SpectrumConfig(budget=0.2, method="int4", allow_drop=True),
    SpectrumConfig(budget=0.2, method="snapkv", allow_drop=True),
    SpectrumConfig(budget=0.2, method="pdtrim", allow_drop=True),
]


@pytest.mark.parametrize(
    "config", KERNEL_CONFIGS, ids=lambda c: f"{c.method}-{c.allocator}-{c.budget}-{c.key_scales}"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_path_matches_reference(kernel_path, config, dtype):
    """The kernel path's buffer: the reference's tier map (same scores up to float
    rounding of the fused norms), the reference bytes for that tier map, and an
    unpack bit-identical to ``decode_kv``."""
    from sglang_spectrum.codec import encode_header, header_tier_map, pack_tiers

    kp, vp, slots = make_pools(layers=2, heads=2, head_dim=16, tokens=60, page=8, dtype=dtype)
    out = region(kp, slots, config, extra=64)
    res = pack_request(kp, vp, slots, config, out=out)
    assert res.path == "kernels"
    t = res.timings_ms  # the caller's own work and the device waits make up the whole call
    assert t["wait"] >= 0 and t["host"] > 0 and t["wait"] <= t["pack"] + t["header"]
    assert t["host"] + t["wait"] == pytest.approx(t["total"])
    header, payload = read_header(out[: res.nbytes])
    assert header.checksum == res.checksum
    tiers = header_tier_map(header)
    keys, values = [k[slots] for k in kp], [v[slots] for v in vp]
    ref = pack_kv(keys, values, config)
    assert res.nbytes <= ref.nbytes + 64 and res.tier_counts == ref.tier_counts
    assert float((tiers == ref.tiers).float().mean()) >= 0.9
    again = pack_tiers(keys, values, header.layout, tiers, header.policy)
    assert torch.equal(again.payload, payload)
    assert encode_header(again.header) == out[: res.nbytes - payload.numel()].numpy().tobytes()
    dk, dv, kept, ok, ov, _ = unpack_vs_decode(out, res, kp, vp, slots)
    for layer in range(2):
        assert same_bits(ok[layer][slots][kept], dk[layer][kept].to(dtype))
        assert same_bits(ov[layer][slots][kept], dv[layer][kept].to(dtype))
        assert torch.isnan(ok[layer][slots][~kept].float()).all()


def test_kernel_path_scores_equal_reference_without_ties(kernel_path):
    """With well separated key norms the fused scores rank like score_tokens: the
    whole buffer equals pack_kv's, context slots included."""
    kp, vp, slots = make_pools(layers=2, heads=2, head_dim=16, tokens=80, page=8, seed=5)
    for p in kp:  # distinct norms: scale each slot's key by its own factor
        p.mul_(torch.linspace(0.5, 4.0, p.shape[0])[torch.randperm(p.shape[0])][:, None, None])
    cfg = SpectrumConfig(budget=0.35, allow_drop=False, key_scales="channel", key_block=16)
    out = region(kp, slots, cfg)
    res = pack_request(kp, vp, slots, cfg, out=out)
    ref = pack_kv([k[slots] for k in kp], [v[slots] for v in vp], cfg)
    assert out[: res.nbytes].numpy().tobytes() == ref.to_bytes()
    ctx, sent = slots[:30], slots[30:]
    out = region(kp, sent, cfg)
    res = pack_request(kp, vp, sent, cfg, out=out, context_slots=ctx)
    header, _ = read_header(out[: res.nbytes])
    scores = score_tokens([k[slots] for k in kp], sinks=cfg.sinks, window=cfg.window)[30:]
    lay = config_layout(cfg, 2, 2, 16, torch.bfloat16, 50)
    sent_cfg = cfg.with_(sinks=0)
    want = allocate_tiers(scores, lay.token_costs(), token_budget(lay, sent_cfg), sent_cfg)
    assert torch.equal(torch.frombuffer(bytearray(header.tier_map), dtype=torch.uint8), want)


def test_kernel_path_unpack_rejects_and_writes_nothing(kernel_path):
    kp, vp, slots = make_pools(layers=2, heads=2, head_dim=16, tokens=40, page=8)
    cfg = SpectrumConfig(budget=0.5, allow_drop=False, key_scales="channel", key_block=8)
    out = region(kp, slots, cfg)
    res = pack_request(kp, vp, slots, cfg, out=out)
    bad = out[: res.nbytes].clone()
    bad[-3] ^= 0x08
    for buf, ss in ((bad, slots), (out, slots + 10_000), (out, slots[:-1])):
        pools_k = [torch.full_like(p, 1.0) for p in kp]
        pools_v = [torch.full_like(p, 1.0) for p in vp]
        with pytest.raises(SpectrumFormatError):
            unpack_request(buf, pools_k, pools_v, ss)
        assert all(bool((p == 1.0).all()) for p in pools_k + pools_v)


def test_waterfall_counts_give_allocate_tiers():
    """The rank waterfall equals policy.allocate_tiers for equal token costs, ties included."""
    from sglang_spectrum.policy import tiers_from_ranks, waterfall_counts

    gen = torch.Generator().manual_seed(0)
    costs = [100, 55, 30, 0]
    methods = [
        {},
        {"tiers": "2"},
        {"method": "int4"},
        {"method": "int8"},
        {"method": "snapkv"},
        {"sinks": 0},
        {"method": "full", "budget": 1.0},
    ]
    for tokens in (1, 3, 17, 200):
        for frac in (0.1, 0.3, 0.55, 0.9, 1.2):
            for extra in methods:
                cfg = SpectrumConfig(**{"budget": 0.5, **extra})
                scores = torch.randint(0, 5, (tokens,), generator=gen).float()  # many ties
                budget = int(frac * tokens * 100)
                table = torch.tensor(costs)[None].expand(tokens, 4)
                try:
                    want = allocate_tiers(scores, table, budget, cfg)
                except SpectrumConfigError:
                    with pytest.raises(SpectrumConfigError):
                        waterfall_counts(tokens, costs, budget, cfg)
                    continue
                forced = min(cfg.sinks, tokens) if cfg.method in ("spectrum", "snapkv") else 0
                got = tiers_from_ranks(scores, forced, waterfall_counts(tokens, costs, budget, cfg))
                assert torch.equal(got, want), (tokens, frac, extra)


def _bench_script(name: str):
    """``bench/<name>.py`` as a module (bench/ stays off sys.path)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_request_path_benchmark_smoke(tmp_path):
    """bench/request_path.py --smoke: the benchmark's code runs on CPU (tiny shapes)."""
    import json

    bench = _bench_script("request_path")
    bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "request_path_smoke.json").read_text())
    recs = data["records"]
    assert len(recs) == 4 * 2 * 2 * 3  # pool pairs x budgets x key scales x links
    need = {"tokens", "budget", "key_scales", "link_gbps", "pack_ms", "unpack_ms"}
    need |= {"kernel_pack_ms", "kernel_unpack_ms", "packed_bytes", "full_bytes", "speedup"}
    need |= {"ideal", "hardware", "pools", "prefill_dtype", "decode_dtype", "speedup_vs_pool"}
    assert all(need <= set(r) for r in recs)
    assert all(r["tier_counts"]["drop"] == 0 for r in recs)
    fp8 = [r for r in recs if r["pools"] == "fp8_e4m3"]
    assert {r["decode_dtype"] for r in fp8} == {"float8_e4m3fn"}
    assert all(r["tier_counts"]["int8"] == 0 for r in fp8)
    assert all(r["baseline_bytes"] * 2 == r["full_bytes"] for r in fp8)
    assert (tmp_path / "request_path_smoke.md").read_text().startswith("# Request path")


def test_part_cost_benchmark_smoke(tmp_path):
    """bench/part_cost.py --smoke: a chunk's layer-group parts timed on CPU (tiny shapes);
    the later parts given the first's map as a tensor or a ChunkTiers pack the same bytes
    (the script checks it), every mode of every size has its record."""
    import json

    bench = _bench_script("part_cost")
    bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "part_cost_smoke.json").read_text())
    recs = data["records"]
    assert sorted((r["tokens"], r["mode"]) for r in recs) == sorted(
        (t, m) for t in (16, 64) for m in bench.MODES
    )
    assert all(r["hardware"] == "cpu" and r["wall_ms"] > 0 and r["layers"] == 2 for r in recs)
    for t in (16, 64):  # the later parts: same tokens, same layer count, same bytes
        later = {r["packed_bytes"] for r in recs if r["tokens"] == t and r["mode"] != "first"}
        assert len(later) == 1
    assert "ChunkTiers / tensor" in (tmp_path / "part_cost_smoke.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_part_breakdown_times_every_step(tmp_path):
    """bench/part_cost.py --breakdown on CUDA: every step of a later part timed alone,
    each a positive host time, the whole part longer than any one launch of it."""
    import json

    bench = _bench_script("part_cost")
    bench.main(["--tokens", "16", "--iters", "3", "--breakdown", "--out", str(tmp_path)])
    times = json.loads((tmp_path / "part_breakdown.json").read_text())["host_us"]
    assert all(v is not None and v > 0 for v in times.values()), times
    assert times["part"] > max(
        times["launch_pack"], times["launch_channel"], times["checksum_parts"]
    )


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: f"{c.budget}-{c.key_scales}")
def test_request_in_parts_fits_the_parts_bound_and_round_trips(config):
    """A request packed as consecutive parts (as the backend streams prefill chunks:
    each part its own budget share, the earlier parts as context, each at
    part_offset of the bytes before it) fits packed_size_bound(parts=...) and unpacks
    part by part into the slots of the whole request."""
    from sglang_spectrum.transfer import part_offset

    kp, vp, slots = make_pools(tokens=400, seed=5)
    _, heads, head_dim = kp[0].shape
    cuts = [0, 128, 256, 400]  # two earlier chunks of 128, the last part 144
    bound = packed_size_bound(400, len(kp), heads, head_dim, kp[0].dtype, config, parts=4)
    buf = torch.zeros(bound, dtype=torch.uint8)
    ok = [torch.full_like(p, float("nan")) for p in kp]
    ov = [torch.full_like(p, float("nan")) for p in vp]
    end, parts = 0, []
    for lo, hi in zip(cuts, cuts[1:]):
        part_cfg = config if hi == cuts[-1] else config.with_(window=0)
        out = region(kp, slots[lo:hi], part_cfg)
        ctx = slots[:lo] if lo else None
        res = pack_request(kp, vp, slots[lo:hi], part_cfg, out=out, context_slots=ctx)
        assert res.num_tokens == hi - lo and res.tier_counts["drop"] == 0
        assert res.nbytes <= out.numel()  # packed_size_bound of the part's tokens
        offset = part_offset(end)
        assert offset % 4096 == 0 and offset + res.nbytes <= bound
        buf[offset : offset + res.nbytes] = out[: res.nbytes]
        parts.append((offset, res.nbytes, res.checksum, lo, hi))
        end = offset + res.nbytes
    # each part within its own share (the codec's bound for its tokens), so all of
    # them within the budget of the whole request but a fixed overhead per extra part
    whole = region(kp, slots, config)
    one = pack_request(kp, vp, slots, config, out=whole)
    assert sum(p[1] for p in parts) <= one.nbytes + 2 * (4096 + 1024)
    for offset, nbytes, checksum, lo, hi in parts:
        unpack_request(
            buf[offset : offset + nbytes], ok, ov, slots[lo:hi], expected_checksum=checksum
        )
    for pool, out_pool in zip(kp + vp, ok + ov):  # every token landed, none elsewhere
        assert not torch.isnan(out_pool[slots].float()).any()
        assert torch.isnan(out_pool[~torch.isin(torch.arange(len(pool)), slots)].float()).all()


@pytest.mark.parametrize("path", ["torch", "kernels"])
def test_layer_groups_with_the_first_groups_tiers_round_trip(path, request):
    """A chunk sent in layer groups (``--spectrum-layer-group``): group 0 is scored and
    allocated on its own layers' keys; the later groups are packed with its tier map
    (``tiers=``). Each group's buffer fits the bound of its layers, holds the same tiers
    and bytes as packing those layers with that map, and unpacks into its layers only;
    together they write exactly what one whole-layer pack with that map writes. Given as a
    ``ChunkTiers`` (what the prefill passes: plan once, pack many) the map packs the very
    same bytes as the plain tensor; on the kernel path its groups of one layer count
    share one plan."""
    if path == "kernels":
        request.getfixturevalue("kernel_path")
    _layer_groups_round_trip("cpu", path)


def test_chunk_tiers_skip_the_slots_check_only_for_the_checked_tensor():
    """A later layer group passing the very slots tensor its first group checked is not
    range-checked again (no readback per part); any other tensor still is, so an
    out-of-range slot is refused, not packed."""
    kp, vp, slots = make_pools(layers=4, tokens=64, seed=11)
    cfg = SpectrumConfig(budget=0.5, allow_drop=False).with_(window=0)
    first = pack_request(kp[:2], vp[:2], slots, cfg, out=region(kp[:2], slots, cfg))
    assert first.slots is slots and first.pool_slots == kp[0].shape[0]
    chosen = ChunkTiers.of(first)
    later = pack_request(
        kp[2:4], vp[2:4], slots, cfg, out=region(kp[2:4], slots, cfg), tiers=chosen
    )
    assert later.num_tokens == 64
    bad = slots.clone()
    bad[3] = kp[0].shape[0]  # one past the pool
    with pytest.raises(SpectrumConfigError, match="out of range"):
        pack_request(kp[2:4], vp[2:4], bad, cfg, out=region(kp[2:4], bad, cfg), tiers=chosen)


def test_chunk_tiers_check_each_later_parts_out_and_head_ranges(request):
    """A later part of a shape its ChunkTiers has packed reuses the layouts and bounds
    derived for it (not derived again per part) but still checks its own ``out``: one byte
    short of the bound, or a region of another dtype, is refused. Head ranges (a
    heterogeneous-TP rank's slices) are a shape of their own, packed as with the plain
    map; a map that needs more bytes than a region holds (allocated for every head, sent
    for one) is refused before any write, on both paths."""
    kp, vp, slots = make_pools(layers=6, heads=2, tokens=48, seed=5)
    cfg = SpectrumConfig(budget=0.5, allow_drop=False).with_(window=0)
    first = pack_request(kp[:2], vp[:2], slots, cfg, out=region(kp[:2], slots, cfg))
    chosen = ChunkTiers.of(first)
    ok = pack_request(kp[2:4], vp[2:4], slots, cfg, out=region(kp[2:4], slots, cfg), tiers=chosen)
    assert len(chosen.parts) == 1 and ok.nbytes == first.nbytes
    short = region(kp[4:6], slots, cfg)[:-1]
    with pytest.raises(SpectrumConfigError, match="needs up to"):
        pack_request(kp[4:6], vp[4:6], slots, cfg, out=short, tiers=chosen)
    with pytest.raises(SpectrumConfigError, match="out must be a uint8 tensor"):
        pack_request(kp[4:6], vp[4:6], slots, cfg, out=short.float(), tiers=chosen)
    one_head = [k[:, :1].contiguous() for k in kp[:2]]
    ranges = [(0, 1), (1, 2)]
    for path in ("torch", "kernels"):
        if path == "kernels":
            request.getfixturevalue("kernel_path")
        outs = [region(one_head, slots, cfg) for _ in ranges]
        split = pack_slices(kp[:2], vp[:2], slots, cfg, outs=outs, heads=ranges)
        chosen = ChunkTiers.of(split[0])
        for _ in range(2):  # the second: a hit of the shape the first derived
            later = [region(one_head, slots, cfg) for _ in ranges]
            parts = pack_slices(
                kp[2:4], vp[2:4], slots, cfg, outs=later, heads=ranges, tiers=chosen
            )
            plain = [region(one_head, slots, cfg) for _ in ranges]
            again = pack_slices(
                kp[2:4], vp[2:4], slots, cfg, outs=plain, heads=ranges, tiers=split[0].tier_map
            )
            assert {p.path for p in parts} == {path}
            for a, b, x, y in zip(parts, again, later, plain):
                assert (a.nbytes, a.checksum, a.heads) == (b.nbytes, b.checksum, b.heads)
                assert torch.equal(x[: a.nbytes], y[: b.nbytes])
        assert len(chosen.parts) == 1
        whole = ChunkTiers.of(first)  # allocated for both heads, sent for one
        with pytest.raises(SpectrumConfigError, match="given tier map needs"):
            pack_request(kp[4:6], vp[4:6], slots, cfg, out=outs[0], tiers=whole, heads=(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_layer_groups_with_the_first_groups_tiers_round_trip():
    _layer_groups_round_trip("cuda", "kernels")


def _layer_groups_round_trip(device: str, path: str) -> None:
    from sglang_spectrum.codec import header_tier_map
    from sglang_spectrum.sizes import packed_size_bound as bound_of

    config = SpectrumConfig(budget=0.4, allow_drop=False, key_scales="channel", key_block=8)
    kp, vp, slots = make_pools(
        layers=7, heads=2, head_dim=16, tokens=90, page=8, seed=7, device=device
    )
    groups = [(0, 2), (2, 4), (4, 6), (6, 7)]
    ok = [torch.full_like(p, float("nan")) for p in kp]
    ov = [torch.full_like(p, float("nan")) for p in vp]
    first = chosen = None
    for l0, l1 in groups:
        k, v = kp[l0:l1], vp[l0:l1]
        out = region(k, slots, config)
        assert out.numel() == bound_of(90, l1 - l0, 2, 16, kp[0].dtype, config)
        res = pack_request(k, v, slots, config, out=out, tiers=chosen)
        if first is not None:  # the plain map packs the same bytes
            plain = region(k, slots, config)
            again = pack_request(k, v, slots, config, out=plain, tiers=first.tier_map)
            assert (again.nbytes, again.checksum) == (res.nbytes, res.checksum)
            assert torch.equal(plain[: res.nbytes], out[: res.nbytes])
        assert res.path == path and res.nbytes <= out.numel()
        assert res.tier_map is not None and res.tier_map.dtype == torch.uint8
        header, _ = read_header(out[: res.nbytes])
        assert header.layout.num_layers == l1 - l0
        if first is None:
            first, chosen = res, ChunkTiers.of(res)
            # group 0's map is that of its own layers' keys, below FP16
            assert res.tier_counts["int8"] + res.tier_counts["int4"] > 0
        else:
            assert res.tier_counts == first.tier_counts
            assert torch.equal(header_tier_map(header), first.tier_map.cpu())
            assert res.tier_map.device == kp[0].device
        info = unpack_request(out, ok[l0:l1], ov[l0:l1], slots, expected_checksum=res.checksum)
        assert info.tier_counts == res.tier_counts
        for layer in range(len(kp)):  # its layers written, the later ones untouched
            written = not torch.isnan(ok[layer][slots].float()).any()
            assert written == (layer < l1), (l0, l1, layer)
    # kernels: one plan per layer count of the later groups (2 layers twice, 1 layer once)
    assert [p.layout.num_layers for p in chosen.plans] == ([2, 1] if path == "kernels" else [])
    assert path == "torch" or chosen.host_map == first.tier_map.cpu().numpy().tobytes()
    if device == "cuda":  # the second 2-layer group launched the compiled kernels directly
        launches = [x for p in chosen.plans for x in p.launches.values() if x is not None]
        assert launches and all(x.runners for x in launches)
    # the same as one pack of every layer with group 0's map
    whole_k = [torch.full_like(p, float("nan")) for p in kp]
    whole_v = [torch.full_like(p, float("nan")) for p in vp]
    out = region(kp, slots, config)
    res = pack_request(kp, vp, slots, config, out=out, tiers=first.tier_map)
    unpack_request(out, whole_k, whole_v, slots, expected_checksum=res.checksum)
    for a, b in zip(ok + ov, whole_k + whole_v):
        assert same_bits(a[slots], b[slots])


def test_given_tiers_are_checked():
    kp, vp, slots = make_pools(layers=2, tokens=40)
    config = SpectrumConfig(budget=0.5, allow_drop=False)
    out = region(kp, slots, config)
    with pytest.raises(SpectrumConfigError, match="tiers holds 39 positions, slots 40"):
        pack_request(kp, vp, slots, config, out=out, tiers=torch.zeros(39, dtype=torch.uint8))
    with pytest.raises(SpectrumConfigError, match="tiers must be a uint8 tensor"):
        pack_request(kp, vp, slots, config, out=out, tiers=torch.zeros(40))
