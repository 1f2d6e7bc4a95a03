"""The quality protocol and the probe on a real model (SmolLM2-135M), short windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sglang_spectrum.config import SpectrumConfigError
from sglang_spectrum.eval.methods import expand_runs, parse_method
from sglang_spectrum.eval.niah import answer_matches, make_trial
from sglang_spectrum.eval.ppl import evaluate_ppl, load_wikitext, plain_hf_nll, wikitext_windows
from sglang_spectrum.eval.probe import ProbeResult, ProbeSettings, cached_probe
from sglang_spectrum.eval.report import markdown_tables, merge_records, plot_records
from sglang_spectrum.eval.runner import (
    KVScales,
    apply_method,
    checkpoint_kv_scales,
    degrade,
    first_layers_scores,
    method_config,
    model_kv_scales,
    pool_cast_kv,
    quantization_param_kv_scales,
)

CONTEXT, CONTINUATION = 256, 32


@pytest.fixture(scope="module")
def smollm():
    from sglang_spectrum.models import load_model

    return load_model("smollm2-135m")


def _by(records, method, metric, budget=None):
    return next(
        r
        for r in records
        if r["method"] == method
        and r["metric"] == metric
        and (budget is None or r["budget"] == budget)
    )


def test_packaged_wikitext_is_the_shared_copy(monkeypatch, tmp_path):
    """A checkout that does not sit beside ``shared/`` (or an installed wheel) reads the
    WikiText-2 test split packaged with the module: the same text as the shared copy."""
    from sglang_spectrum.eval import ppl

    monkeypatch.delenv(ppl.WIKITEXT_ENV, raising=False)
    monkeypatch.setattr(ppl, "_DEFAULT_WIKITEXT", tmp_path / "missing")
    packaged = load_wikitext()
    assert len(packaged) > 1_200_000 and packaged.startswith(" = Robert Boulter = ")
    shared = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
    if shared.is_file():
        assert packaged == shared.read_bytes().decode("utf-8").replace("\r\n", "\n")


@pytest.mark.slow
def test_ppl_protocol_full_matches_plain_hf_and_baselines_order(smollm):
    model, tok = smollm
    text = load_wikitext()
    runs = expand_runs(["full", "spectrum-3tier", "int8", "pdtrim"], [0.5, 1.0], ["paper"])
    records = evaluate_ppl(
        model,
        tok,
        runs,
        context=CONTEXT,
        continuation=CONTINUATION,
        windows=2,
        text=text,
        progress=False,
    )
    windows = wikitext_windows(tok, text, CONTEXT, CONTINUATION, 2)
    plain = torch.cat([plain_hf_nll(model, w, CONTEXT) for w in windows])
    plain_ppl = math.exp(float(plain.mean()))
    full = _by(records, "full", "ppl")["value"]
    # The only difference is the 16-bit wire format of the FP16 tier (fp32 model here).
    assert full == pytest.approx(plain_ppl, rel=2e-3)
    assert _by(records, "spectrum-3tier", "ppl", 1.0)["value"] == pytest.approx(full, rel=1e-6)
    assert _by(records, "spectrum-3tier", "ppl", 1.0)["bytes_ratio"] >= 1.0
    pdtrim = _by(records, "pdtrim", "ppl_delta_pct", 0.5)["value"]
    int8 = _by(records, "int8", "ppl_delta_pct", 0.5)["value"]
    assert pdtrim > int8 + 1.0  # pruning half the prompt hurts far more than INT8
    for r in records:
        assert r["bytes_ratio"] <= r["budget"] + (0.01 if r["budget"] == 1.0 else 0)


def test_method_names_parse_and_reject_typos():
    m = parse_method("spectrum-3tier+had+g32")
    cfg = m.config(0.3, "optimal")
    assert (cfg.rotation, cfg.group_size, cfg.tiers, cfg.allocator) == (
        "hadamard",
        32,
        "3",
        "optimal",
    )
    assert parse_method("spectrum-auto").config(0.5, "paper", auto_tiers="3").tiers == "3"
    assert parse_method("int4").config(0.3).method == "int4"
    with pytest.raises(SpectrumConfigError, match="unknown method"):
        parse_method("spectrum-4tier")
    with pytest.raises(SpectrumConfigError, match="option"):
        parse_method("int4+fast")
    runs = expand_runs(["full", "pdtrim", "spectrum-2tier"], [0.3, 0.5], ["paper", "optimal"])
    assert len(runs) == 1 + 2 + 4


def test_niah_trial_has_exact_length_and_needle(smollm):
    _, tok = smollm
    hay = tok(load_wikitext()[:50000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    trial = make_trial(tok, hay, 1000, 0.5, seed=3)
    assert trial.context == trial.input_ids.numel() <= 1000
    assert trial.needle in tok.decode(trial.input_ids)
    assert answer_matches(f" {trial.needle}.", trial.needle)
    assert not answer_matches(f" {trial.needle[:-1]}0", trial.needle)


def test_probe_cache_hits_and_refresh(tmp_path):
    calls = []

    def run():
        calls.append(1)
        return ProbeResult(
            decision="3",
            passed=True,
            reason="3/3",
            context=512,
            trials=[{"degraded_ok": True}] * 3,
            seconds=1.0,
        )

    s = ProbeSettings()
    first = cached_probe("weights-a", run, s, cache_dir=tmp_path)
    second = cached_probe("weights-a", run, s, cache_dir=tmp_path)
    assert (first.cached, second.cached, len(calls)) == (False, True, 1)
    assert second.decision == "3"
    cached_probe("weights-b", run, s, cache_dir=tmp_path)  # other weights: new run
    cached_probe("weights-a", run, ProbeSettings(budget=0.25), cache_dir=tmp_path)  # settings
    cached_probe("weights-a", run, s, refresh=True, cache_dir=tmp_path)
    assert len(calls) == 4
    for f in tmp_path.iterdir():  # corrupt cache files are ignored, not fatal
        f.write_text("{not json")
    assert cached_probe("weights-a", run, s, cache_dir=tmp_path).cached is False


def test_reports_merge_tables_and_plots(tmp_path):
    rec = {
        "model": "m",
        "method": "spectrum-3tier",
        "allocator": "paper",
        "budget": 0.5,
        "metric": "ppl_delta_pct",
        "context": 1024,
        "value": 0.4,
        "n": 4,
        "stderr": 0.1,
        "bytes_ratio": 0.499,
    }
    full = {
        **rec,
        "method": "full",
        "allocator": "-",
        "budget": 1.0,
        "value": 0.0,
        "bytes_ratio": 1.0,
    }
    path = tmp_path / "q.json"
    merge_records(path, [rec, full])
    merged = merge_records(path, [{**rec, "value": 0.3}])  # same key: replaced
    assert len(merged) == 2 and json.loads(path.read_text())[1]["value"] == 0.3
    md = markdown_tables(merged)
    assert "+0.30%" in md and "(0.499)" in md
    pngs = plot_records(merged, tmp_path)
    assert pngs and pngs[0].stat().st_size > 1000


# --------------------------------------------------------------------------- FP8 baselines


@pytest.fixture(scope="module")
def smollm_kv(smollm):
    from sglang_spectrum.eval.hf_bridge import prefill

    model, tok = smollm
    ids = tok(load_wikitext()[:20000], return_tensors="pt").input_ids[:, :CONTEXT]
    return prefill(model, ids, obs_window=8, full_keys=True)


def test_fp8_and_kn_layers_methods_parse_and_reject_typos():
    for name, dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        m = parse_method(name)
        assert m.is_pool_cast and not m.uses_allocator and m.pool_dtype == dtype
        with pytest.raises(SpectrumConfigError, match="cast"):
            m.config(0.5)
    for bad in ("fp8_e4m3+kc", "fp8_e5m2+kn", "fp8_e4m3+had"):
        with pytest.raises(SpectrumConfigError, match="no options"):
            parse_method(bad)
    for bad in ("fp8_e4m4", "fp8-e4m3", "fp8", "FP8_E4M3"):
        with pytest.raises(SpectrumConfigError, match="unknown method"):
            parse_method(bad)
    # FP8 runs once, at its byte ratio 0.5, whatever the budgets.
    runs = expand_runs(["full", "fp8_e4m3", "pdtrim"], [0.3, 0.5], ["paper"])
    assert [(m.name, a, b) for m, a, b in runs] == [
        ("full", "-", 1.0),
        ("fp8_e4m3", "-", 0.5),
        ("pdtrim", "-", 0.3),
        ("pdtrim", "-", 0.5),
    ]
    m = parse_method("spectrum-auto+kc+kn4")
    assert (m.key_norm, m.key_norm_layers, m.key_scales) == (True, 4, "channel")
    assert parse_method("spectrum-auto+kc+kn").key_norm_layers is None
    for bad in ("spectrum-auto+kn0", "spectrum-auto+knx", "spectrum-auto+kn-1"):
        with pytest.raises(SpectrumConfigError, match="option"):
            parse_method(bad)


@pytest.mark.slow
def test_fp8_round_trip_is_the_plain_cast_bitwise(smollm_kv):
    kv = smollm_kv
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        keys, values, kept, ratio, key = pool_cast_kv(kv, dtype)
        assert ratio == 0.5 and bool(kept.all()) and kept.numel() == kv.num_tokens
        for got, ref in zip(keys + values, kv.keys + kv.values):
            want = ref.to(dtype).to(ref.dtype)  # what a scale-1.0 FP8 pool gives back
            assert got.dtype == ref.dtype and torch.equal(got, want)
            assert not torch.equal(got, ref)  # it is lossy
        assert key == pool_cast_kv(kv, dtype)[4]  # same bytes, same memo key
    # bf16 KV (as SGLang computes it) too.
    x = kv.keys[3].to(torch.bfloat16)
    kv16 = type(kv)(**{**kv.__dict__, "keys": [x], "values": [x]})
    got = pool_cast_kv(kv16, torch.float8_e4m3fn)[0][0]
    assert torch.equal(got, x.to(torch.float8_e4m3fn).to(torch.bfloat16))


@pytest.mark.slow
def test_fp8_scales_are_honoured(smollm, smollm_kv, tmp_path):
    from safetensors.torch import save_file

    kv = smollm_kv
    n = len(kv.keys)
    k_s = tuple(2.0 if i == 0 else 1.0 for i in range(n))
    v_s = tuple(0.25 if i == 1 else 1.0 for i in range(n))
    keys, values, _, ratio, key = pool_cast_kv(kv, torch.float8_e4m3fn, KVScales(k_s, v_s))
    assert ratio == 0.5
    # SGLang: (x / scale).to(fp8) in the pool, fp8 * scale in attention.
    want_k0 = (kv.keys[0] / 2.0).to(torch.float8_e4m3fn).float() * 2.0
    want_v1 = (kv.values[1] / 0.25).to(torch.float8_e4m3fn).float() * 0.25
    assert torch.equal(keys[0], want_k0) and torch.equal(values[1], want_v1)
    plain_k, plain_v, _, _, plain_key = pool_cast_kv(kv, torch.float8_e4m3fn)
    assert not torch.equal(keys[0], plain_k[0]) and not torch.equal(values[1], plain_v[1])
    assert torch.equal(keys[1], plain_k[1]) and key != plain_key
    with pytest.raises(SpectrumConfigError, match="scales"):
        pool_cast_kv(kv, torch.float8_e4m3fn, KVScales.ones(n - 1))

    # Checkpoint tensors, by SGLang's names and rules (4 layers).
    t = torch.tensor
    save_file(
        {
            "model.layers.0.self_attn.k_scale": t(0.5),
            "model.layers.0.self_attn.v_scale": t(0.25),
            "model.layers.1.self_attn.kv_scale": t(2.0),  # deprecated: K and V
            "model.layers.2.self_attn.k_proj.output_scale": t(3.0),  # quark, K only
            "model.layers.0.self_attn.k_proj.weight": torch.zeros(2, 2),
        },
        str(tmp_path / "model.safetensors"),
    )
    s = checkpoint_kv_scales(tmp_path, 4)
    assert (s.k, s.v) == ((0.5, 2.0, 3.0, 1.0), (0.25, 2.0, 3.0, 1.0))
    assert s.source.startswith("checkpoint")
    (tmp_path / "q.json").write_text(
        json.dumps({"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"1": 0.5}}}})
    )
    q = quantization_param_kv_scales(tmp_path / "q.json", 3)
    assert (q.k, q.v) == ((1.0, 0.5, 1.0), (1.0, 0.5, 1.0))
    # The stand-in models carry no scales: 1.0, as SGLang defaults.
    model, _ = smollm
    ours = model_kv_scales(model, n)
    assert ours.k == ours.v == (1.0,) * n and "no KV scales" in ours.source

    # Through the harness: apply_method takes the scales (FP8 ignores the budget).
    ids = torch.tensor([[1, 2, 3]])
    scaled, r = apply_method(
        model, kv, "fp8_e4m3", "-", 0.5, next_ids=ids, kv_scales=KVScales(k_s, v_s)
    )
    plain, _ = apply_method(model, kv, "fp8_e4m3", "-", 0.5, next_ids=ids)
    assert r == 0.5 and not torch.equal(scaled, plain)


@pytest.mark.slow
def test_fp8_methods_run_through_the_ppl_protocol(smollm):
    model, tok = smollm
    runs = expand_runs(["full", "fp8_e4m3", "fp8_e5m2"], [0.3], ["paper"])
    records = evaluate_ppl(
        model, tok, runs, context=CONTEXT, continuation=CONTINUATION, windows=2, progress=False
    )
    for name in ("fp8_e4m3", "fp8_e5m2"):
        r = _by(records, name, "ppl_delta_pct", 0.5)
        assert r["bytes_ratio"] == 0.5 and r["kv_scales"].startswith("1.0")
        assert len(r["window_nll"]) == 2 and abs(r["value"]) < 5.0


# --------------------------------------------------------------------------- +knG


def _tier_map(kv, name, budget=0.3):
    m = parse_method(name)
    config = method_config(m, "paper", budget, "3")
    scores = first_layers_scores(kv, m.key_norm_layers, config) if m.key_norm_layers else None
    return degrade(kv, config, use_queries=not m.key_norm, scores=scores)[4][0]


@pytest.mark.slow
def test_kn_layers_scores_come_only_from_the_first_layers(smollm_kv):
    kv = smollm_kv
    n = len(kv.keys)
    assert kv.full_keys is not None and all(a is b for a, b in zip(kv.full_keys, kv.keys))
    # All layers: exactly the codec's own +kn scoring.
    assert _tier_map(kv, f"spectrum-3tier+kc+kn{n}") == _tier_map(kv, "spectrum-3tier+kc+kn")
    g = 4
    base = _tier_map(kv, f"spectrum-3tier+kc+kn{g}")
    assert base != _tier_map(kv, "spectrum-3tier+kc+kn")  # it is another tier map

    def with_keys(change):
        keys = [change(li, k) for li, k in enumerate(kv.keys)]
        return type(kv)(**{**kv.__dict__, "keys": keys, "full_keys": keys})

    gen = torch.Generator().manual_seed(0)

    def scramble(k):  # other norms for every token
        return k * torch.rand(k.shape[0], 1, 1, generator=gen) * 3

    later = with_keys(lambda li, k: scramble(k) if li >= g else k)
    assert _tier_map(later, f"spectrum-3tier+kc+kn{g}") == base
    assert _tier_map(later, "spectrum-3tier+kc+kn") != _tier_map(kv, "spectrum-3tier+kc+kn")
    first = with_keys(lambda li, k: scramble(k) if li == g - 1 else k)
    assert _tier_map(first, f"spectrum-3tier+kc+kn{g}") != base
    with pytest.raises(SpectrumConfigError, match="layers"):
        _tier_map(kv, f"spectrum-3tier+kn{n + 1}")


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path.home() / ".cache/sglang_spectrum/models/gemma3-270m").is_dir(),
    reason="gemma3-270m not fetched",
)
def test_full_keys_of_sliding_layers_match_the_cache():
    from sglang_spectrum.eval.hf_bridge import prefill
    from sglang_spectrum.models import load_model

    model, tok = load_model("gemma3-270m")
    ids = tok(load_wikitext()[:20000], return_tensors="pt").input_ids[:, :600]
    kv = prefill(model, ids, obs_window=0, full_keys=True)
    sliding = [li for li, f in enumerate(kv.layer_first_pos) if f > 0]
    assert sliding and len(kv.full_keys) == len(kv.keys)
    for li, (full, held, f) in enumerate(zip(kv.full_keys, kv.keys, kv.layer_first_pos)):
        assert full.shape[0] == 600
        assert torch.equal(full[f:], held), li  # the cached suffix, bit for bit
    # Without full keys, +knG refuses sliding layers instead of scoring a suffix.
    kv0 = prefill(model, ids, obs_window=0)
    with pytest.raises(SpectrumConfigError, match="full_keys"):
        first_layers_scores(
            kv0, 2, method_config(parse_method("spectrum-3tier+kn2"), "paper", 0.3, "3")
        )


def test_report_shows_fp8_beside_ours_and_the_first_group_table(tmp_path):
    def rec(method, metric, budget, value, alloc="paper", context=2048, **kw):
        return {"model": "m", "method": method, "allocator": alloc, "budget": budget,
                "metric": metric, "context": context, "value": value, "n": 3,
                "stderr": 0.1, "bytes_ratio": min(budget, 1.0), **kw}  # fmt: skip

    kn, kn4 = "spectrum-auto+kc+kn", "spectrum-auto+kc+kn4"
    w = [2.0, 2.1, 2.2]
    recs = [
        rec("full", "ppl", 1.0, 10.0, "-", window_nll=w),
        rec("full", "ppl_delta_pct", 1.0, 0.0, "-"),
        rec("fp8_e4m3", "ppl_delta_pct", 0.5, 0.8, "-"),
        rec("full", "niah_acc", 1.0, 1.0, "-", context=4096, hits=[True, True]),
    ]
    for b in (0.3, 0.5):
        recs += [
            rec(kn, "ppl", b, 10.1, window_nll=[x + 0.01 for x in w]),
            rec(kn, "ppl_delta_pct", b, 1.0),
            rec(kn4, "ppl", b, 10.105, window_nll=[x + 0.0105 for x in w]),  # +0.05 %
            rec(kn4, "ppl_delta_pct", b, 1.05),
            rec(kn, "niah_acc", b, 1.0, context=4096, hits=[True, True]),
            rec(
                kn4, "niah_acc", b, 0.5 if b == 0.3 else 1.0, context=4096, hits=[b != 0.3, True]
            ),  # fmt: skip
            rec(kn, "niah_retention", b, 1.0, context=4096),
        ]
    md = markdown_tables(recs)
    head = md[md.index("### m: ppl C=2048") :]
    assert "| fp8_e4m3 |  | +0.80% ±0.10 |  |  |" in head  # FP8: the b=0.5 column only
    assert head.index(f"| {kn} |") < head.index("| fp8_e4m3 |")
    table = md[md.index("## Tier map from the first layer group") :]
    row = next(line for line in table.splitlines() if line.startswith("| 4 |"))
    assert "+0.05%" in row and "-1/+0" in row and "no (NIAH b=0.3)" in row
    assert "Smallest G meeting the target on m: none of [4]." in table
    assert "NIAH 4096 tokens, 3 trials, full precision 100%)" in table
    # a full-precision record of another run (other trials) is not shown as the reference's
    other = [dict(r, n=20) if r["method"] == "full" else r for r in recs]
    other_md = markdown_tables(other)
    assert "NIAH 4096 tokens, 3 trials)" in other_md[other_md.index("## Tier map from") :]
    recs = [r for r in recs if not (r["method"] == kn4 and r["metric"] == "niah_acc")]
    recs.append(rec(kn4, "niah_acc", 0.3, 1.0, context=4096, hits=[True, True]))
    recs.append(rec(kn4, "niah_acc", 0.5, 1.0, context=4096, hits=[True, True]))
    assert "on m: **4**." in markdown_tables(recs)
    assert plot_records(recs, tmp_path)


@pytest.mark.slow
def test_spectrum_over_an_fp8_pool_is_lossless_at_half_budget(smollm_kv):
    """``+fp8``: packed from SGLang's FP8 e4m3 pool; at b=0.5 every token travels in the
    pool's own FP8 bytes, so the decode gets exactly what the FP8 KV cache holds (the
    fp8_e4m3 baseline's values); at b=0.3 FP8 and INT4 mix within the budget."""
    from sglang_spectrum.eval.runner import degrade, method_config

    kv = smollm_kv
    method = parse_method("spectrum-3tier+kc+kn+fp8")
    assert method.fp8_pool
    ones = KVScales.ones(len(kv.keys))
    cast_k, cast_v, _, _, _ = pool_cast_kv(kv, torch.float8_e4m3fn)
    cfg = method_config(method, "paper", 0.5, "3")
    keys, values, kept, ratio, _ = degrade(kv, cfg, use_queries=False, fp8_scales=ones)
    assert bool(kept.all()) and ratio <= 0.5 + 0.01
    for a, b in zip(keys + values, cast_k + cast_v):
        assert torch.equal(a, b)
    cfg = method_config(method, "paper", 0.3, "3")
    keys, values, kept, ratio, _ = degrade(kv, cfg, use_queries=False, fp8_scales=ones)
    assert bool(kept.all()) and ratio <= 0.3
    assert any(not torch.equal(a, b) for a, b in zip(keys, cast_k))  # INT4 rows somewhere
