"""Pick the channel-key pack's default launch shape from a ``bench/channel_kernel.py`` run.

A candidate replaces :data:`~sglang_spectrum.kernels.channel.DEFAULT_TUNING` only if, in
the same run as the default (its baseline: the records whose fields are the default's):

- it wrote the default's bytes at every point (``same_bytes``), and was timed at every
  point the default was (tokens x budget);
- its tile layout is one every Triton version gives (``channel_group`` 0 or 1: the grouped
  tiles are a Triton 3.6 heuristic that 3.9 spills, ``bench/channel_ptx.py``);
- its pack is at least ``--margin`` faster than the default's at every point (the worst
  point's ratio decides: these machines are noisy, one fast length is not enough);
- its round trip (pack + unpack: the unpack shares the launch fields ``head_major``,
  ``heads_per_program``, ``channels``, ``num_warps``) is not slower at any point: a
  request pays both.

Among those, the one with the lowest worst-point pack ratio. ``--write FILE`` rewrites
the ``DEFAULT_TUNING = ...`` line of ``FILE`` (``kernels/channel.py``) with the choice, so
the GPU tests and ``bench/request_path.py`` that follow in the same device call
(``scripts/device_channel_pack.sh``) run the code as it would be committed.

Usage::

    python bench/pick_channel_default.py $OUT/channel_kernel.json --out $OUT \\
        [--write kernels/channel.py]
    # -> $OUT/channel_default.json (the choice, each candidate's ratios and why not)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re

from sglang_spectrum.kernels.channel import DEFAULT_TUNING, ChannelTuning

FIELDS = [f.name for f in dataclasses.fields(ChannelTuning)]
# the assignment, on one line or wrapped as ruff formats it (no field holds a parenthesis)
DEFAULT_LINE = re.compile(r"^DEFAULT_TUNING = ChannelTuning\([^)]*\)$", re.M)


def tuning_of(record: dict) -> ChannelTuning:
    """The :class:`ChannelTuning` a record was timed with (fields a record lacks: the
    dataclass's defaults, as the sweep that wrote it had no such field)."""
    base = ChannelTuning()
    return ChannelTuning(**{f: record.get(f, getattr(base, f)) for f in FIELDS})


def arguments(tuning: ChannelTuning) -> str:
    """``channels=64, ...``: the fields that differ from the dataclass's, as arguments."""
    base = ChannelTuning()
    args = [f"{f}={getattr(tuning, f)!r}" for f in FIELDS if getattr(tuning, f) != getattr(base, f)]
    return ", ".join(args)


def source(tuning: ChannelTuning) -> str:
    """``ChannelTuning(channels=64, ...)``: the call that makes ``tuning``."""
    return f"ChannelTuning({arguments(tuning)})"


def pick(records: list[dict], default: ChannelTuning = DEFAULT_TUNING, margin: float = 0.03):
    """(chosen tuning, rows): ``rows`` one per tuning timed, with its worst pack and
    round-trip ratios to ``default`` over the points and why it is not eligible (``""``:
    eligible). The chosen is ``default`` when no candidate qualifies."""
    by_tuning: dict[ChannelTuning, dict] = {}
    for r in records:
        point = (r["tokens"], r["budget"])
        by_tuning.setdefault(tuning_of(r), {})[point] = r
    if default not in by_tuning:
        raise SystemExit("pick_channel_default: the run did not time the default shape")
    base = by_tuning[default]
    rows, best, best_ratio = [], default, 1.0 - margin
    for tuning, points in by_tuning.items():
        missing = [p for p in base if p not in points]
        pack = _worst_ratio(points, base, lambda r: r["kernel_pack_ms"])
        trip = _worst_ratio(points, base, lambda r: r["kernel_pack_ms"] + r["kernel_unpack_ms"])
        why = (
            "the default" if tuning == default
            else f"not timed at {missing}" if missing
            else "different bytes" if not all(r["same_bytes"] for r in points.values())
            else f"channel_group {tuning.channel_group}: a Triton-3.6-only layout"
            if tuning.channel_group not in (0, 1)
            else f"pack not {margin:.0%} faster at every point" if pack > 1.0 - margin
            else f"round trip {trip:.2f}x the default's" if trip > 1.0
            else ""
        )  # fmt: skip
        rows.append(
            {
                "tuning": source(tuning),
                "shape": next(iter(points.values())).get("shape"),
                "worst_pack_ratio": round(pack, 4),
                "worst_round_trip_ratio": round(trip, 4),
                "pack_vs_copy": {
                    f"{t}@{b}": points[(t, b)]["kernel_pack_vs_copy"] for t, b in sorted(points)
                },
                "not_eligible": why,
            }
        )
        if not why and pack < best_ratio:
            best, best_ratio = tuning, pack
    return best, rows


def _worst_ratio(points: dict, base: dict, ms) -> float:
    """The largest ``ms(points[p]) / ms(base[p])`` over the points both were timed at."""
    return max(ms(points[p]) / ms(base[p]) for p in base if p in points)


def write_default(path: pathlib.Path, tuning: ChannelTuning) -> bool:
    """Rewrite ``path``'s ``DEFAULT_TUNING = ...`` assignment; whether the text changed."""
    text = path.read_text()
    if len(DEFAULT_LINE.findall(text)) != 1:
        raise SystemExit(f"pick_channel_default: no single DEFAULT_TUNING line in {path}")
    line = f"DEFAULT_TUNING = {source(tuning)}"
    if len(line) > 100:  # the project's line length: wrapped as ruff formats a call
        line = f"DEFAULT_TUNING = ChannelTuning(\n    {arguments(tuning)}\n)"
    new = DEFAULT_LINE.sub(lambda _: line, text)
    path.write_text(new)
    return new != text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="a bench/channel_kernel.py JSON")
    ap.add_argument("--margin", type=float, default=0.03)
    ap.add_argument("--out", default=None, help="write channel_default.json here")
    ap.add_argument("--write", default=None, help="rewrite this file's DEFAULT_TUNING line")
    args = ap.parse_args(argv)
    run = json.loads(pathlib.Path(args.result).read_text())
    chosen, rows = pick(run["records"], DEFAULT_TUNING, args.margin)
    print("| shape | tuning | worst pack ratio | worst round-trip ratio | not eligible |")
    print("|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["worst_pack_ratio"]):
        print(
            f"| {r['shape']} | {r['tuning']} | {r['worst_pack_ratio']}"
            f" | {r['worst_round_trip_ratio']} | {r['not_eligible'] or '-'} |"
        )
    changed = chosen != DEFAULT_TUNING
    print(f"default: {source(DEFAULT_TUNING)}\nchosen: {source(chosen)} (changed: {changed})")
    if args.write:
        write_default(pathlib.Path(args.write), chosen)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {
            "hardware": run.get("hardware"),
            "triton": run.get("triton"),
            "source": str(args.result),
            "margin": args.margin,
            "default": source(DEFAULT_TUNING),
            "chosen": source(chosen),
            "changed": changed,
            "candidates": rows,
        }
        (out / "channel_default.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
