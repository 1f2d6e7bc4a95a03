"""Layout proof: FlashInfer decodes over pools filled by our unpack kernel.

SGLang's MHA pools ``[num_slots, kv_heads, head_dim]`` are FlashInfer's NHD
paged cache ``[num_pages, page_size, kv_heads, head_dim]`` (a page = a run of
``page_size`` slots). Requests are packed from "prefill" pools by the pack
kernel, unpacked by the unpack kernel into "decode" pools (poisoned with NaN
first), and ``BatchDecodeWithPagedKVCacheWrapper`` attention over those pools
must equal torch attention over the reference-dequantised KV (``decode_kv``).
Dropped tokens: with page size 1 their slots are simply left out of the page
table (they stay NaN, so any read of them would show).

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


def _run(page: int, budget: float, lengths=(37, 300, 1025), seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots, num_slots = _alloc_pages(lengths, page, gen)

    def pools(fill=None):
        if fill is not None:
            return [
                torch.full((num_slots, KV_HEADS, HEAD_DIM), fill, dtype=DTYPE, device="cuda")
                for _ in range(LAYERS)
            ]
        return [
            (torch.randn(num_slots, KV_HEADS, HEAD_DIM, generator=gen) * 2).to(DTYPE).cuda()
            for _ in range(LAYERS)
        ]

    pk, pv = pools(), pools()  # prefill side
    dk, dv = pools(float("nan")), pools(float("nan"))  # decode side, poisoned
    refs, kept, origs = [], [], []
    for s in slots:
        keys, values = [k[s] for k in pk], [v[s] for v in pv]
        origs.append((keys, values))
        layout, tiers = plan_tiers(keys, values, SpectrumConfig(budget=budget))
        packed = K.pack_from_pools(pk, pv, s, layout, tiers)
        buf = packed.to_tensor()
        K.unpack_to_pools(buf, dk, dv, s)
        rk, rv, mask = decode_kv(buf)
        refs.append((rk, rv))
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
        kv_data_type=DTYPE,
    )
    worst = lossy = 0.0
    for layer in range(LAYERS):
        q = torch.randn(len(lengths), Q_HEADS, HEAD_DIM, generator=gen).to(DTYPE).cuda()
        cache = (
            dk[layer].view(-1, page, KV_HEADS, HEAD_DIM),
            dv[layer].view(-1, page, KV_HEADS, HEAD_DIM),
        )
        out = wrapper.run(q, cache)
        for b, ((rk, rv), m, (ok, ov)) in enumerate(zip(refs, kept, origs)):
            ref = _reference_attention(q[b], rk[layer][m], rv[layer][m])
            err = float((out[b].float() - ref).abs().max())
            worst = max(worst, err)
            assert not torch.isnan(out[b]).any()
            # bf16 output rounding and FlashInfer's float32 order: ~1e-2 at outputs of a few units
            assert err <= 2e-2 * max(1.0, float(ref.abs().max())), (layer, b, err)
            # For scale: the same attention over the original (unquantised) KV.
            orig = _reference_attention(q[b], ok[layer][m], ov[layer][m])
            lossy = max(lossy, float((out[b].float() - orig).abs().max()))
    print(
        f"flashinfer page={page} budget={budget} lengths={lengths} tiers(last)={counts}"
        f" max|out-ref(decode_kv)|={worst:.2e} (vs original KV: {lossy:.2e})"
    )
    return counts


@pytest.mark.parametrize("page", [1, 16])
def test_decode_over_unpacked_pools(page):
    _run(page, budget=0.5)


def test_decode_with_dropped_tokens_omitted_from_page_table():
    counts = _run(1, budget=0.15)
    assert counts["drop"] > 0
