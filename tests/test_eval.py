"""The quality protocol and the probe on a real model (SmolLM2-135M), short windows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sglang_spectrum.config import SpectrumConfigError
from sglang_spectrum.eval.methods import expand_runs, parse_method
from sglang_spectrum.eval.niah import answer_matches, make_trial
from sglang_spectrum.eval.ppl import evaluate_ppl, load_wikitext, plain_hf_nll, wikitext_windows
from sglang_spectrum.eval.probe import ProbeResult, ProbeSettings, cached_probe
from sglang_spectrum.eval.report import markdown_tables, merge_records, plot_records

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
