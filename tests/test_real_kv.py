"""The codec on real prompt KV of real models (SmolLM2-135M, Gemma-3-270M)."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_spectrum import SpectrumConfig, Tier, decode_kv, pack_kv, unpack_kv
from sglang_spectrum.codec import make_layout, pack_tiers

pytestmark = pytest.mark.slow


def _prompt_kv(name: str, tokens: int):
    from sglang_spectrum.eval.hf_bridge import prefill
    from sglang_spectrum.eval.ppl import load_wikitext
    from sglang_spectrum.models import load_model

    model, tok = load_model(name)
    ids = tok(load_wikitext()[:30000], return_tensors="pt", add_special_tokens=False).input_ids
    kv = prefill(model, ids[:, :tokens])
    # Serving pools are 16-bit: test on what the prefill node would really hold.
    kv.keys = [k.to(torch.bfloat16) for k in kv.keys]
    kv.values = [v.to(torch.bfloat16) for v in kv.values]
    return kv


@pytest.fixture(scope="module")
def smollm_kv():
    return _prompt_kv("smollm2-135m", 384)


@pytest.mark.parametrize("tier,bits", [(Tier.INT8, 8), (Tier.INT4, 4)])
def test_real_kv_round_trip_within_bound(smollm_kv, tier, bits):
    from test_codec import quant_bound

    kv = smollm_kv
    layout = make_layout(kv.keys, SpectrumConfig())
    tiers = torch.full((kv.num_tokens,), int(tier), dtype=torch.uint8)
    packed = pack_tiers(kv.keys, kv.values, layout, tiers)
    dk, dv, _ = decode_kv(packed.to_bytes(), dtype=torch.float32)
    rel = []
    for src, out in list(zip(kv.keys, dk)) + list(zip(kv.values, dv)):
        assert ((src.float() - out).abs() <= quant_bound(src, bits, layout.group_size)).all()
        rel.append(float((src.float() - out).norm() / src.float().norm()))
    # Measured on SmolLM2 (see bench/results/codec.md): INT8 ~0.5%, INT4 ~9% relative.
    assert max(rel) < (0.02 if bits == 8 else 0.2)


@pytest.mark.parametrize("tiers", ["3", "2"])
def test_real_kv_budgets(smollm_kv, tiers):
    kv = smollm_kv
    for budget in (0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0):
        cfg = SpectrumConfig(budget=budget, tiers=tiers)
        packed = pack_kv(kv.keys, kv.values, cfg, queries=kv.queries)
        if budget < 1.0:
            assert packed.nbytes <= math.floor(budget * packed.full_nbytes)
            assert packed.nbytes >= 0.99 * budget * packed.full_nbytes
        assert (packed.tiers[:4] == int(Tier.FP16)).all()
        k_pools = [torch.zeros(500, *k.shape[1:], dtype=torch.bfloat16) for k in kv.keys]
        v_pools = [torch.zeros_like(p) for p in k_pools]
        slots = torch.randperm(500)[: kv.num_tokens]
        info = unpack_kv(packed.to_bytes(), k_pools, v_pools, slots)
        if budget == 1.0:
            assert info.dropped.numel() == 0
            assert all(torch.equal(p[slots], k) for p, k in zip(k_pools, kv.keys))


def test_real_gemma_sliding_layers_carry_only_their_window():
    kv = _prompt_kv("gemma3-270m", 600)
    short = [p for p in kv.layer_first_pos if p > 0]
    assert short and all(p == 600 - kv.keys[i].shape[0] for i, p in enumerate(kv.layer_first_pos))
    packed = pack_kv(kv.keys, kv.values, SpectrumConfig(budget=0.4), queries=kv.queries)
    held = sum(k.shape[0] for k in kv.keys)
    assert packed.full_nbytes == held * 2 * kv.keys[0].shape[1] * kv.keys[0].shape[2] * 2
    assert packed.nbytes <= 0.4 * packed.full_nbytes
    dk, _, kept = decode_kv(packed.to_bytes())
    assert [k.shape for k in dk] == [k.shape for k in kv.keys]
    assert kept.sum() > 0.9 * 600
