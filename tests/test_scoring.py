"""Importance scoring against naive per-head computations."""

from __future__ import annotations

import torch

from sglang_spectrum.scoring import attention_scores, key_norm_scores, score_tokens


def naive_attention(keys, queries, total):
    """Loop over KV heads and their query heads, as written in SnapKV (no pooling)."""
    out = []
    for k, q in zip(keys, queries):
        first = total - k.shape[0]
        w, hq, d = q.shape
        hk = k.shape[1]
        row = torch.zeros(total)
        for h in range(hk):
            acc = torch.zeros(k.shape[0])
            for g in range(hq // hk):
                for i in range(w):
                    pos = total - w + i
                    logits = k[:, h].float() @ q[i, h * (hq // hk) + g].float() / d**0.5
                    logits[torch.arange(first, total) > pos] = float("-inf")
                    acc += logits.softmax(0)
            row[first:] += acc / hk
        out.append(row / row.sum())
    return torch.stack(out)


def test_attention_scores_match_naive_gqa_aggregation():
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(6, 2, 8, generator=g), torch.randn(4, 2, 8, generator=g)]
    queries = [torch.randn(3, 6, 8, generator=g) for _ in range(2)]
    got = attention_scores(keys, queries, num_tokens=6)  # 6 < pooling kernel: no smoothing
    torch.testing.assert_close(got, naive_attention(keys, queries, 6), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1, :2], torch.zeros(2))  # the short layer holds positions 2..5


def test_attention_scores_find_the_attended_token():
    g = torch.Generator().manual_seed(1)
    keys = [torch.randn(64, 1, 16, generator=g) * 0.1]
    target = keys[0][20, 0]
    queries = [target.repeat(4, 2, 1) * 40]  # every query looks for token 20
    scores = score_tokens(keys, queries, sinks=0, window=4)
    assert int(scores[:60].argmax()) in range(17, 24)  # max-pooled neighbourhood


def test_key_norm_fallback_ranks_small_norms_high_and_lifts_sinks_and_recent():
    keys = [torch.linspace(1, 2, 40)[:, None, None].expand(40, 2, 4).contiguous()]
    ranks = key_norm_scores(keys)
    assert torch.all(torch.diff(ranks[0]) < 0)  # growing norm, falling importance
    s = score_tokens(keys, sinks=2, window=5)
    assert torch.all(s[:2] > s[2:].max())
    assert torch.all(s[-5:].min() > s[2:-5].max())
    per_layer = score_tokens(keys * 3, sinks=2, window=5, per_layer=True)
    assert per_layer.shape == (3, 40)
