"""hf_bridge against real models: KV round trip, masks, sliding windows, query capture."""

from __future__ import annotations

import sys

import pytest
import torch

from sglang_spectrum.eval.hf_bridge import (
    continue_from_kv,
    greedy_generate_from_kv,
    layer_types,
    prefill,
    sliding_window,
)

MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"]
TOL = 1e-3  # fp32; observed diffs are 0 .. 2e-5

_TEXT = (
    "The lighthouse keeper wrote in his log every evening. On Monday the sea was calm and "
    "a fishing boat named Aurora passed the northern rocks at seven. On Tuesday a storm "
    "came from the west, the lamp flickered twice, and the keeper climbed the 117 steps to "
    "clean the lens. The secret code for the supply room is 4721. On Wednesday the supply "
    "ship arrived with coffee, oil, two crates of apples and a letter from his sister. "
)

_loaded: dict[str, tuple] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On the shared 2-core box, 2 intra-op threads next to other busy processes made every
    # forward ~10x slower (OpenMP barriers); 1 thread is fast and predictable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    _loaded.clear()


def _model(name: str):
    if name not in _loaded:
        from sglang_spectrum.models import load_model

        _loaded[name] = load_model(name)  # fp32, eager attention
    return _loaded[name]


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _ids(tok, n: int) -> torch.Tensor:
    text = _TEXT * (1 + n // 60)
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] >= n
    return ids[:, :n]


def _reference_logits(model, ids: torch.Tensor, T: int, kept: torch.Tensor | None):
    """One forward over all T+M tokens with absolute-position masks; logits of the last M.

    Prompt rows are plain causal (the prompt KV is computed undegraded on the prefill
    side); rows of new tokens additionally hide prompt positions with kept == False.
    """
    n = ids.shape[1]
    q = torch.arange(n)[:, None]
    p = torch.arange(n)[None, :]
    base = p <= q
    if kept is not None:
        hidden = (q >= T) & (p < T) & ~torch.cat([kept, torch.ones(n - T, dtype=torch.bool)])[p]
        base = base & ~hidden
    masks = {}
    for kind in dict.fromkeys(layer_types(model)):
        ok = base & (p > q - sliding_window(model)) if kind == "sliding_attention" else base
        m = torch.zeros(n, n).masked_fill(~ok, torch.finfo(torch.float32).min)
        masks[kind] = m[None, None]
    mask = masks if "sliding_attention" in masks else masks["full_attention"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=n - T)
    return out.logits[0].float()


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_continue_matches_single_forward(name):
    model, tok = _model(name)
    T, M = 48, 8
    ids = _ids(tok, T + M)
    kv = prefill(model, ids[:, :T])
    cfg = model.config
    assert len(kv.keys) == len(kv.values) == cfg.num_hidden_layers
    assert kv.keys[0].shape == (T, cfg.num_key_value_heads, _head_dim(cfg))
    assert kv.layer_first_pos == [0] * cfg.num_hidden_layers
    assert kv.num_tokens == T and kv.logits_last.shape == (cfg.vocab_size,)
    with torch.no_grad():
        ref = model(input_ids=ids, logits_to_keep=M + 1).logits[0].float()
    assert (kv.logits_last - ref[0]).abs().max().item() < TOL
    for kept in (None, torch.ones(T, dtype=torch.bool)):
        got = continue_from_kv(model, kv.keys, kv.values, kv.layer_first_pos, T, kept, ids[:, T:])
        assert got.shape == (M, cfg.vocab_size)
        assert (got - ref[1:]).abs().max().item() < TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_kept_mask_hides_dropped_positions(name):
    model, tok = _model(name)
    T, M = 48, 8
    ids = _ids(tok, T + M)
    kv = prefill(model, ids[:, :T], obs_window=0)
    assert kv.queries is None
    kept = torch.rand(T, generator=torch.Generator().manual_seed(1)) > 0.35
    kept[0] = True  # keep the attention sink: a realistic policy does
    got = continue_from_kv(model, kv.keys, kv.values, kv.layer_first_pos, T, kept, ids[:, T:])
    ref = _reference_logits(model, ids, T, kept)
    assert (got - ref).abs().max().item() < TOL
    full = continue_from_kv(model, kv.keys, kv.values, kv.layer_first_pos, T, None, ids[:, T:])
    assert (got - full).abs().max().item() > 0.1  # dropping really changed something


@pytest.mark.slow
def test_kept_equals_physically_removed_tokens():
    """Independent of our mask code: a cache holding only kept rows, HF's own causal mask,
    rotary positions continuing at T."""
    from transformers import DynamicCache

    model, tok = _model("smollm2-135m")
    T, M = 48, 8
    ids = _ids(tok, T + M)
    kv = prefill(model, ids[:, :T], obs_window=0)
    kept = torch.ones(T, dtype=torch.bool)
    kept[[3, 7, 8, 20, 33, 47]] = False
    cache = DynamicCache(config=model.config)
    for layer, k, v in zip(cache.layers, kv.keys, kv.values):
        layer.update(k[kept].transpose(0, 1)[None], v[kept].transpose(0, 1)[None])
    n = int(kept.sum())
    with torch.no_grad():
        ref = model(
            input_ids=ids[:, T:],
            position_ids=torch.arange(T, T + M)[None],
            cache_position=torch.arange(n, n + M),
            past_key_values=cache,
        ).logits[0]
    got = continue_from_kv(model, kv.keys, kv.values, kv.layer_first_pos, T, kept, ids[:, T:])
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.slow
def test_gemma3_sliding_layers_truncate():
    model, tok = _model("gemma3-270m")
    W = sliding_window(model)
    assert W == 512
    T, M = 600, 8
    ids = _ids(tok, T + M)
    kv = prefill(model, ids[:, :T], obs_window=4)
    types = layer_types(model)
    for li, kind in enumerate(types):
        # transformers keeps the last W-1 positions: all the next token (at T) can see.
        want_first = T - (W - 1) if kind == "sliding_attention" else 0
        assert kv.layer_first_pos[li] == want_first, (li, kind)
        assert kv.keys[li].shape[0] == kv.values[li].shape[0] == T - want_first
    assert kv.layer_first_pos.count(0) == types.count("full_attention") == 3

    ref = _reference_logits(model, ids, T, None)
    got = continue_from_kv(model, kv.keys, kv.values, kv.layer_first_pos, T, None, ids[:, T:])
    assert (got - ref).abs().max().item() < TOL

    # Drops both outside the sliding window (only full layers see them) and inside it.
    kept = torch.ones(T, dtype=torch.bool)
    kept[torch.arange(5, T, 7)] = False
    got = continue_from_kv(model, kv.keys, kv.values, kv.layer_first_pos, T, kept, ids[:, T:])
    ref = _reference_logits(model, ids, T, kept)
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_captured_queries_reproduce_attention(name):
    model, tok = _model(name)
    T, w = 40, 8
    ids = _ids(tok, T)
    kv = prefill(model, ids, obs_window=w)
    cfg = model.config
    assert len(kv.queries) == cfg.num_hidden_layers
    assert kv.queries[0].shape == (w, cfg.num_attention_heads, _head_dim(cfg))
    with torch.no_grad():
        attn = model(input_ids=ids, output_attentions=True, logits_to_keep=1).attentions
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    causal = torch.arange(T)[None, :] <= torch.arange(T - w, T)[:, None]  # [w, T]
    for li, layer in enumerate(model.model.layers):
        k = kv.keys[li].repeat_interleave(rep, dim=1)  # [T, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", kv.queries[li], k) * layer.self_attn.scaling
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        assert (probs - attn[li][0, :, T - w :, :]).abs().max().item() < 1e-5, li


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_greedy_generate_matches_hf_generate(name):
    model, tok = _model(name)
    T, N = 48, 10
    ids = _ids(tok, T)
    kv = prefill(model, ids, obs_window=0)
    got = greedy_generate_from_kv(
        model, kv.keys, kv.values, kv.layer_first_pos, T, None, kv.logits_last, N, None
    )
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            pad_token_id=0,
        )[0, T:].tolist()
    assert got == ref
    # EOS stops decoding and is not returned.
    stop = greedy_generate_from_kv(
        model, kv.keys, kv.values, kv.layer_first_pos, T, None, kv.logits_last, N, ref[3]
    )
    assert stop == ref[: ref.index(ref[3])]
    one = greedy_generate_from_kv(
        model, kv.keys, kv.values, kv.layer_first_pos, T, None, kv.logits_last, 1, [-1]
    )
    assert one == ref[:1]


@pytest.mark.slow
def test_rope_wrapper_restored_on_error():
    model, _ = _model("smollm2-135m")
    mod = sys.modules[type(model).__module__]
    orig = mod.apply_rotary_pos_emb
    bad = torch.tensor([[model.config.vocab_size + 5]])  # embedding lookup fails
    with pytest.raises(IndexError):
        prefill(model, bad)
    assert mod.apply_rotary_pos_emb is orig


@pytest.mark.slow
def test_input_validation():
    model, tok = _model("smollm2-135m")
    ids = _ids(tok, 12)
    with pytest.raises(ValueError):
        prefill(model, ids[0])
    kv = prefill(model, ids, obs_window=0)
    nxt = _ids(tok, 2)
    with pytest.raises(ValueError):  # kept of the wrong length
        continue_from_kv(
            model, kv.keys, kv.values, kv.layer_first_pos, 12, torch.ones(5, dtype=bool), nxt
        )
    with pytest.raises(ValueError):  # rows do not match layer_first_pos
        continue_from_kv(model, kv.keys, kv.values, [1] * len(kv.keys), 12, None, nxt)
    with pytest.raises(ValueError):  # wrong number of layers
        continue_from_kv(
            model, kv.keys[:-1], kv.values[:-1], kv.layer_first_pos[:-1], 12, None, nxt
        )
