"""bench/serving_gpu_records.py + serving_gpu_report.py: each request's TTFT from
bench_serving's ``--output-details`` output, and the bootstrap intervals of the TTFT p50
and of its ratio to a baseline that the GPU serving report prints beside them."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest
from bench_modules import serving_gpu

records = serving_gpu("serving_gpu_records")
report = serving_gpu("serving_gpu_report")


def test_bench_argv_asks_bench_serving_for_every_request():
    argv = records.bench_argv("http://h:1", "/m", 4096, 4, 8, 20, Path("/tmp/o.jsonl"))
    assert "--output-details" in argv and argv[argv.index("--num-prompts") + 1] == "20"


def test_request_ttfts_drop_failed_requests_and_read_seconds_as_ms():
    # bench_serving's details: ttfts in seconds, one error string per request ("" = ok)
    res = {"ttfts": [0.25, 0.0, 0.5, 0.125], "errors": ["", "timeout", "", ""]}
    assert records.request_ttfts_ms(res) == [125.0, 250.0, 500.0]
    assert records.request_ttfts_ms({"median_ttft_ms": 3.0}) is None  # no details


def _rec(ttfts: list[float], **kw) -> dict:
    return {"ttfts_ms": ttfts, "ttft_p50_ms": statistics.median(ttfts), **kw}


def test_p50_interval_holds_the_median_and_narrows_with_more_requests():
    rng = random.Random(3)
    few = [rng.lognormvariate(6, 0.3) for _ in range(20)]
    many = few + [rng.lognormvariate(6, 0.3) for _ in range(180)]
    lo, hi = report.p50_ci(_rec(few))
    assert lo <= statistics.median(few) <= hi and lo < hi
    lo2, hi2 = report.p50_ci(_rec(many))
    assert hi2 - lo2 < hi - lo
    assert report.p50_ci(_rec(few[:4])) is None  # too few to say
    assert report.p50_ci({"ttft_p50_ms": 1.0}) is None  # an older record: no requests
    assert report.p50_ci(_rec(few)) == (lo, hi)  # seeded: the same table every time


def test_ratio_interval_brackets_the_ratio_and_shows_in_the_table():
    rng = random.Random(4)
    base = [rng.gauss(1600, 150) for _ in range(20)]
    ours = [rng.gauss(560, 60) for _ in range(20)]
    common = {"input_len": 4096, "concurrency": 4, "link": "tcp", "hardware": "H200"}
    moon = _rec(base, config="mooncake@tcp", backend="mooncake", **common)
    spec = _rec(ours, config="spectrum:0.5@tcp", backend="spectrum", **common)
    lo, hi = report.ratio_ci(spec, moon)
    point = spec["ttft_p50_ms"] / moon["ttft_p50_ms"]
    assert lo <= point <= hi and hi < 1.0
    cells = report.ratio_cells(spec, report.baselines([moon, spec]))
    assert cells == [f"{point:.2f}x ({lo:.2f}-{hi:.2f})", "-"]  # no mooncake-fp8 record
    assert report.ratio_cells(moon, report.baselines([moon, spec]))[0] == "1.00x"


@pytest.mark.parametrize("n", [0, 4])
def test_ratio_interval_needs_both_samples(n):
    assert report.ratio_ci(_rec([1.0] * 20), _rec([2.0] * n) if n else {"ttft_p50_ms": 2}) is None


def _decode_line(created: float, tl: dict, pre_created: float, pre_tl: dict, first: float):
    """A decode stats line as the backend writes it (the prefill's nested in it)."""
    profile = [[4096, 0.5, first, 1.0, 2.0, 20.0, 0, 8]]
    pre = {"created_unix_ms": pre_created, "timeline_ms": pre_tl, "part_profile": profile}
    return {"role": "decode", "created_unix_ms": created, "timeline_ms": tl, "prefill": pre}


def test_request_timeline_puts_both_servers_on_the_decode_clock():
    line = _decode_line(
        1000.0,
        {"granted": 2.0, "first_landed": None, "sent": 90.0, "ready": 91.5, "polled": 95.0},
        1003.0,
        {"ready": 1.0, "sent": 85.0},
        10.0,
    )
    t = records.request_timeline(line)
    assert t == {
        "decode_granted": 2.0,
        "prefill_created": 3.0,
        "prefill_ready": 4.0,
        "first_part": 13.0,
        "prefill_sent": 88.0,
        "decode_sent": 90.0,
        "decode_ready": 91.5,
        "decode_polled": 95.0,
    }
    assert list(t) == [k for k in records.TIMELINE if k in t]  # in the events' order
    assert records.request_timeline({"role": "decode", "prefill": {}}) is None  # older line
    late = _decode_line(0.0, {**line["timeline_ms"], "polled": 195.0}, 3.0, {"sent": 85.0}, 10)
    med = records.median_timeline([line, late, {"role": "decode"}])
    assert med["decode_polled"] == 145.0 and med["prefill_ready"] == 4.0  # (one had it)
    rec = {"config": "spectrum:0.5@tcp", "input_len": 4096, "concurrency": 4}
    rows = report.timeline_rows([{**rec, "timeline_ms": med, "ttft_p50_ms": 160.0}])
    assert rows[0].split(" | ")[3:5] == ["decode_granted", "prefill_created"]
    assert rows[2].endswith("| 145.0 | 160 |")


def test_sglang_stages_read_both_roles_of_the_request_time_stats_lines():
    # as SGLang's Req.log_time_stats writes them (0.5.17 and 0.5.23), among other lines
    prefill = "\n".join(
        f"[2026-12-05 08:00:0{i}] ReqTimeStats(rid=r{i}, bootstrap_room={i}, input_len=4096, "
        f"cached_input_len=0, output_len=1, attempts=1, type=prefill): bootstrap_duration="
        f"{i}.00ms, queue_duration={10 * i}.50ms, forward_duration=120.00ms, entry_time="
        "1796457600.123, transfer_speed=1.50 GB/s, transfer_total=256.00 MB"
        for i in (1, 2, 3)
    )
    decode = (
        "[2026-12-05 08:00:01] Decode batch. #running-req: 1\n"
        "[2026-12-05 08:00:02] ReqTimeStats(rid=r1, bootstrap_room=1, input_len=4096, "
        "cached_input_len=0, output_len=8, attempts=1, type=decode): bootstrap_duration=2.00ms, "
        "alloc_wait_duration=0.10ms, transfer_duration=90.00ms, queue_duration=30.00ms, "
        "forward_duration=200.00ms, entry_time=1796457600.120\n"
    )
    stages = records.sglang_stages({"prefill": prefill, "decode": decode, "proxy": "nothing"})
    assert stages["prefill"] == {
        "bootstrap_duration": 2.0,
        "queue_duration": 20.5,
        "forward_duration": 120.0,
        "requests": 3,
    }
    assert stages["decode"]["transfer_duration"] == 90.0 and stages["decode"]["requests"] == 1
    assert records.sglang_stages({"prefill": "no such lines"}) is None
    rec = {"config": "mooncake@tcp", "input_len": 4096, "concurrency": 4, "ttft_p50_ms": 1642}
    rows = report.stage_rows([{**rec, "sglang_stage_ms": stages}])
    assert rows[0].startswith("| config | input | conc | prefill bootstrap | prefill queue |")
    assert rows[2] == (
        "| mooncake@tcp | 4096 | 4 | 2.0 | 20.5 | 120.0 | 2.0 | 0.1 | 90.0 | 30.0 | 200.0 | 1642 |"
    )


def test_auto_is_set_against_the_fixed_budgets_of_the_same_deployment_only():
    rng = random.Random(5)
    common = {"input_len": 4096, "concurrency": 4, "link": "tcp", "backend": "spectrum"}

    def spec(config: str, mean: float, budget, mode: str) -> dict:
        ttfts = [rng.gauss(mean, 30) for _ in range(20)]
        return _rec(ttfts, config=config, budget=budget, budget_mode=mode, **common)

    auto = spec("spectrum:auto+lg8@tcp", 580, "auto", "auto")
    auto["chosen_budget_mean"] = 0.3
    fixed5 = spec("spectrum:0.5+lg8@tcp", 560, 0.5, "fixed")
    fixed3 = spec("spectrum:0.3+lg8@tcp", 520, 0.3, "fixed")
    other = spec("spectrum:0.5+lg8+sent@tcp", 470, 0.5, "fixed")  # not the same deployment
    elsewhere = spec("spectrum:0.3+lg8@tcp", 100, 0.3, "fixed") | {"concurrency": 1}
    assert report._sans_budget(auto) == report._sans_budget(fixed3) == "spectrum:+lg8@tcp"
    assert report._sans_budget(other) == "spectrum:+lg8+sent@tcp"
    rows = report.auto_rows([auto, fixed5, other, fixed3, elsewhere])
    assert len(rows) == 3  # header, rule, one auto record
    row = rows[2]
    assert "b=0.3" in row and "b=0.5" in row and "470" not in row and "100 ms" not in row
    assert row.index("b=0.3") < row.index("b=0.5")  # the best fixed budget first
    lo, hi = report.ratio_ci(auto, fixed3)
    assert f"{auto['ttft_p50_ms'] / fixed3['ttft_p50_ms']:.2f}x ({lo:.2f}-{hi:.2f})" in row
    assert report.auto_rows([auto, other]) == []  # no fixed budget of its deployment
    table = {"hardware": "H200", "ttft_mean_ms": 1.0, "ttft_p99_ms": 1.0, "req_per_s": 1.0}
    table |= dict.fromkeys(("bytes_per_req", "pack_ms", "transfer_ms", "unpack_ms", "link_gbps"), 1)
    md = report.markdown([auto | table, fixed3 | table], None)
    assert "## `auto` against the fixed budgets" in md and "b=0.3" in md
