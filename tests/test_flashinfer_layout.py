"""Layout proof: FlashInfer decodes over pools filled by our unpack kernel.

SGLang's MHA pools ``[num_slots, kv_heads, head_dim]`` are FlashInfer's NHD
paged cache ``[num_pages, page_size, kv_heads, head_dim]`` (a page = a run of
``page_size`` slots). Requests are packed from "prefill" pools by the pack
kernel, unpacked by the unpack kernel into "decode" pools (poisoned with NaN
first), and ``BatchDecodeWithPagedKVCacheWrapper`` attention over those pools
must equal torch attention over the reference-dequantised KV (``decode_kv``).
Dropped tokens: with page size 1 their slots are simply left out of the page
table (they stay NaN, so any read of them would show).

FP8 pools (SGLang ``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``): the decode's pools are
uint8 buffers that FlashInfer reads as ``kv_data_type`` float8 with ``k_scale`` /
``v_scale`` at ``run`` (as SGLang's FlashInfer backend calls it), filled by the unpack
kernel from a bf16 prefill (the asymmetric deployment) or from FP8 prefill pools; the
reference is torch attention over the FP8-stored ``decode_kv`` values times the scales.

GPU only: skips without CUDA or without flashinfer.
"""

from __future__ import annotations

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
flashinfer = pytest.importorskip("flashinfer")

from sglang_spectrum import kernels as K  # noqa: E402
from sglang_spectrum.codec import decode_kv, plan_tiers  # noqa: E402
from sglang_spectrum.config import SpectrumConfig  # noqa: E402
from sglang_spectrum.fp8 import FP8Pool, dequantize_fp8, quantize_fp8  # noqa: E402

pytestmark = pytest.mark.gpu

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 2, 8, 32, 128
DTYPE = torch.bfloat16


def _alloc_pages(lengths, page, gen):
    """Shuffled, non-contiguous pages per request; returns (slots per request, num_slots)."""
    need = [-(-t // page) for t in lengths]
    perm = torch.randperm(sum(need) + 5, generator=gen)
    slots, at = [], 0
    for t, n in zip(lengths, need):
        pages = perm[at : at + n]
        at += n
        slots.append((pages[:, None] * page + torch.arange(page)).reshape(-1)[:t].cuda())
    return slots, (sum(need) + 5) * page


def _reference_attention(q, keys, values):
    """q ``[Hq, D]``, keys/values ``[n, Hkv, D]`` -> float32 ``[Hq, D]`` (GQA)."""
    group = Q_HEADS // KV_HEADS
    k = keys.float().repeat_interleave(group, dim=1)  # [n, Hq, D]
    v = values.float().repeat_interleave(group, dim=1)
    s = torch.einsum("hd,nhd->hn", q.float(), k) / math.sqrt(HEAD_DIM)
    return torch.einsum("hn,nhd->hd", s.softmax(-1), v)


def _as_read(rows: torch.Tensor, fp8: FP8Pool | None, layer: int, key: bool) -> torch.Tensor:
    """float32 values FlashInfer reads from a pool that stored float32 ``rows`` (bf16, or
    FP8 with the layer's scale)."""
    if fp8 is None:
        return rows.to(DTYPE).float()
    scale = fp8.scale(layer, key)
    return dequantize_fp8(quantize_fp8(rows.float(), fp8.dtype, scale), fp8.dtype, scale)


def _run(
    page: int,
    budget: float,
    lengths=(37, 300, 1025),
    seed=0,
    src: FP8Pool | None = None,
    dst: FP8Pool | None = None,
    allow_drop: bool = True,
):
    """``src`` / ``dst``: FP8 prefill / decode pools (uint8, these dtypes and scales),
    else bf16; ``allow_drop=False`` as in serving (short prompts go above the budget)."""
    gen = torch.Generator().manual_seed(seed)
    slots, num_slots = _alloc_pages(lengths, page, gen)
    shape = (num_slots, KV_HEADS, HEAD_DIM)

    def pools(fp8: FP8Pool | None, key: bool, fill=None):
        out = []
        for layer in range(LAYERS):
            if fill is not None:  # NaN: 0x7F in both FP8 formats
                x = torch.full(shape, 0x7F, dtype=torch.uint8) if fp8 else torch.full(shape, fill)
            else:
                x = torch.randn(shape, generator=gen) * 2
                x = quantize_fp8(x, fp8.dtype, fp8.scale(layer, key)) if fp8 else x
            out.append(x.to(torch.uint8 if fp8 else DTYPE).cuda())
        return out

    pk, pv = pools(src, True), pools(src, False)  # prefill side
    nan = float("nan")
    dk, dv = pools(dst, True, nan), pools(dst, False, nan)  # decode side, poisoned
    refs, kept, origs = [], [], []
    for s in slots:
        keys, values = [k[s] for k in pk], [v[s] for v in pv]
        if src is not None:
            keys, values = [k.view(src.dtype) for k in keys], [v.view(src.dtype) for v in values]
        origs.append(([k.float() for k in keys], [v.float() for v in values]))
        config = SpectrumConfig(budget=budget, allow_drop=allow_drop)
        layout, tiers = plan_tiers(keys, values, config, fp8=src)
        packed = K.pack_from_pools(pk, pv, s, layout, tiers)
        buf = packed.to_tensor()
        K.unpack_to_pools(buf, dk, dv, s, fp8=dst)
        rk, rv, mask = decode_kv(buf, dtype=torch.float32)
        refs.append(
            (
                [_as_read(k, dst, layer, True) for layer, k in enumerate(rk)],
                [_as_read(v, dst, layer, False) for layer, v in enumerate(rv)],
            )
        )
        kept.append(mask.cuda())
    counts = packed.tier_counts

    # Page table: whole pages, or (page 1) only the kept slots.
    if page == 1:
        indices = [s[m] for s, m in zip(slots, kept)]
        lens = [int(m.sum()) for m in kept]
        last = [1] * len(lengths)
    else:
        assert all(bool(m.all()) for m in kept), "paged test expects no dropped tokens"
        indices = [s[::page] // page for s in slots]
        lens = [len(i) for i in indices]
        last = [t - (len(i) - 1) * page for t, i in zip(lengths, indices)]
    indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(
        indptr.cuda(),
        torch.cat(indices).int(),
        torch.tensor(last, dtype=torch.int32, device="cuda"),
        Q_HEADS,
        KV_HEADS,
        HEAD_DIM,
        page,
        q_data_type=DTYPE,
        kv_data_type=DTYPE if dst is None else dst.dtype,
    )
    worst = lossy = 0.0
    for layer in range(LAYERS):
        q = torch.randn(len(lengths), Q_HEADS, HEAD_DIM, generator=gen).to(DTYPE).cuda()
        cache = (
            dk[layer].view(-1, page, KV_HEADS, HEAD_DIM),
            dv[layer].view(-1, page, KV_HEADS, HEAD_DIM),
        )
        if dst is None:
            out = wrapper.run(q, cache)
        else:  # as SGLang's FlashInfer backend: float8 views, per-layer scales at run
            cache = tuple(c.view(dst.dtype) for c in cache)
            out = wrapper.run(q, cache, k_scale=dst.k_scales[layer], v_scale=dst.v_scales[layer])
        for b, ((rk, rv), m, (ok, ov)) in enumerate(zip(refs, kept, origs)):
            ref = _reference_attention(q[b], rk[layer][m], rv[layer][m])
            err = float((out[b].float() - ref).abs().max())
            worst = max(worst, err)
            assert not torch.isnan(out[b]).any()
            # bf16 output rounding and FlashInfer's float32 order: ~1e-2 at outputs of a few units
            assert err <= 2e-2 * max(1.0, float(ref.abs().max())), (layer, b, err)
            # For scale: the same attention over the original (unquantised) KV.
            if src is not None:
                ok_l = ok[layer] * src.k_scales[layer]
                ov_l = ov[layer] * src.v_scales[layer]
            else:
                ok_l, ov_l = ok[layer], ov[layer]
            orig = _reference_attention(q[b], ok_l[m], ov_l[m])
            lossy = max(lossy, float((out[b].float() - orig).abs().max()))
    print(
        f"flashinfer page={page} budget={budget} src={src and src.name} dst={dst and dst.name}"
        f" lengths={lengths} tiers(last)={counts}"
        f" max|out-ref(decode_kv)|={worst:.2e} (vs original KV: {lossy:.2e})"
    )
    return counts


@pytest.mark.parametrize("page", [1, 16])
def test_decode_over_unpacked_pools(page):
    _run(page, budget=0.5)


def test_decode_with_dropped_tokens_omitted_from_page_table():
    counts = _run(1, budget=0.15)
    assert counts["drop"] > 0


FP8_CASES = [  # (prefill pools, decode pools)
    (None, FP8Pool.of(torch.float8_e4m3fn, LAYERS, [0.5, 2.0], 0.25)),  # bf16 -> FP8
    (None, FP8Pool.of(torch.float8_e5m2, LAYERS)),
    (FP8Pool.of(torch.float8_e4m3fn, LAYERS, [0.5, 2.0], 0.25),) * 2,  # FP8 -> FP8
    (FP8Pool.of(torch.float8_e4m3fn, LAYERS, 1.5), FP8Pool.of(torch.float8_e5m2, LAYERS, 0.5)),
]


@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("budget", [0.3, 0.5])
@pytest.mark.parametrize(
    "src,dst", FP8_CASES, ids=["bf16-e4m3", "bf16-e5m2", "e4m3-e4m3", "e4m3-e5m2"]
)
def test_decode_over_unpacked_fp8_pools(page, budget, src, dst):
    """FlashInfer reads the FP8 pools our unpack kernel writes (float8 ``kv_data_type``,
    per-layer ``k_scale`` / ``v_scale``), from bf16 and from FP8 prefill pools (page 1:
    dropped tokens left out of the page table; page 16: none dropped, as in serving)."""
    _run(page, budget=budget, src=src, dst=dst, allow_drop=page == 1)
