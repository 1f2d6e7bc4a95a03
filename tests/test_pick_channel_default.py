"""bench/pick_channel_default.py on real sweeps of the H200 (the committed
``bench/results/gpu_calls`` files): which launch shape becomes the channel pack's
default, and the rewrite of ``kernels/channel.py``'s ``DEFAULT_TUNING`` line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bench_modules import bench_script

pytest.importorskip("triton")
pick = bench_script("pick_channel_default")
ROOT = Path(__file__).resolve().parents[1]
CALLS = ROOT / "bench" / "results" / "gpu_calls"
# the default from 2026-12-05 to 2026-12-06: the baseline of the s9-s13 sweeps
S9_DEFAULT = pick.ChannelTuning(channels=64, num_warps=1, narrow=True)


def records(path: str) -> list[dict]:
    return json.loads((CALLS / path).read_text())["records"]


def test_the_ninth_sessions_sweep_picks_a_one_warp_64_channel_shape():
    """s9 timed the fields' defaults against 1-warp shapes: the pick is a 64-channel
    1-warp shape (s9 made one of the two the default), faster at both lengths, its round
    trip not slower; the shapes no faster at every length are named as such."""
    chosen, rows = pick.pick(
        records("2026-12-05-s9/channel_kernel_narrow.json"), pick.ChannelTuning()
    )
    assert (chosen.channels, chosen.num_warps) == (64, 1)
    row = next(r for r in rows if r["tuning"] == pick.source(chosen))
    assert row["not_eligible"] == "" and row["worst_pack_ratio"] < 0.97
    assert row["worst_round_trip_ratio"] <= 1.0
    slower = [
        r for r in rows if r["worst_pack_ratio"] > 0.97 and r["not_eligible"] != "the default"
    ]
    assert slower and all("faster at every point" in r["not_eligible"] for r in slower)


def test_register_caps_keep_the_default(tmp_path):
    """s13's register caps were all slower than that session's default: the pick keeps it,
    and the rewrite of a file that holds it (one line) changes nothing."""
    chosen, _ = pick.pick(records("2026-12-05-s13/call1/channel_kernel.json"), S9_DEFAULT)
    assert chosen == S9_DEFAULT
    copy = tmp_path / "channel.py"
    shutil.copy(ROOT / "kernels" / "channel.py", copy)
    assert pick.write_default(copy, S9_DEFAULT)  # the wrapped assignment -> one line
    text = copy.read_text()
    assert "DEFAULT_TUNING = ChannelTuning(channels=64, num_warps=1, narrow=True)\n" in text
    assert not pick.write_default(copy, chosen)
    assert copy.read_text() == text


def test_the_seventeenth_sessions_sweep_picks_the_committed_default(tmp_path):
    """s17's sweep of 17 shapes on the H200: the pick is 32 channels, one warp, ``words``
    with a thread a word of every row, the committed ``DEFAULT_TUNING``; rewriting
    ``kernels/channel.py`` with it changes nothing (the wrapped form is found and kept)."""
    run = records("2026-12-06-s17/call1_channel_pack/channel_kernel.json")
    chosen, rows = pick.pick(run, S9_DEFAULT)
    assert chosen == pick.DEFAULT_TUNING
    assert (chosen.channels, chosen.words, chosen.load_bytes) == (32, True, 4)
    row = next(r for r in rows if r["tuning"] == pick.source(chosen))
    assert row["worst_pack_ratio"] < 0.8 and row["worst_round_trip_ratio"] < 1.0
    copy = tmp_path / "channel.py"
    shutil.copy(ROOT / "kernels" / "channel.py", copy)
    assert not pick.write_default(copy, chosen)
    assert copy.read_text() == (ROOT / "kernels" / "channel.py").read_text()
    assert pick.pick(run)[0] == chosen  # against itself: no candidate beats it by 3 %


def test_a_faster_shape_is_written_as_the_default(tmp_path):
    """A shape faster at every point with the same bytes replaces the default line; one
    with other bytes, one timed at a single length and a grouped tile never do."""
    base = records("2026-12-05-s13/call1/channel_kernel.json")
    default = [r for r in base if pick.tuning_of(r) == S9_DEFAULT]
    fast = [
        dict(r, words=True, channel_group=1, load_bytes=4, kernel_pack_ms=r["kernel_pack_ms"] * 0.8)
        for r in default
    ]
    wrong = [
        dict(r, words=True, kernel_pack_ms=r["kernel_pack_ms"] * 0.5, same_bytes=False)
        for r in default
    ]
    grouped = [dict(r, channel_group=8, kernel_pack_ms=r["kernel_pack_ms"] * 0.6) for r in default]
    single = [dict(default[0], channels=32, kernel_pack_ms=default[0]["kernel_pack_ms"] * 0.5)]
    chosen, rows = pick.pick(default + fast + wrong + grouped + single, S9_DEFAULT)
    assert chosen == pick.ChannelTuning(
        channels=64,
        num_warps=1,
        narrow=True,
        fill_rows=False,
        channel_group=1,
        words=True,
        load_bytes=4,
    )
    why = {r["tuning"]: r["not_eligible"] for r in rows}
    assert why[pick.source(pick.tuning_of(wrong[0]))] == "different bytes"
    assert "Triton-3.6-only" in why[pick.source(pick.tuning_of(grouped[0]))]
    assert why[pick.source(pick.tuning_of(single[0]))].startswith("not timed at")
    copy = tmp_path / "channel.py"
    shutil.copy(ROOT / "kernels" / "channel.py", copy)
    assert pick.write_default(copy, chosen)
    (assignment,) = pick.DEFAULT_LINE.findall(copy.read_text())
    assert max(len(x) for x in assignment.splitlines()) <= 100  # wrapped where long
    assert eval(assignment.split(" = ", 1)[1], {"ChannelTuning": pick.ChannelTuning}) == chosen
