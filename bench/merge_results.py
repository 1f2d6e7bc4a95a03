"""Merge the per-run quality JSON files into bench/results/quality.json (+ .md, plots).

.venv/bin/python bench/merge_results.py bench/results/gpu/*.json bench/results/cpu/*.json

Later files win for records with the same key (model, method, allocator, budget,
metric, context); records of bench/results/quality.json no file replaces stay.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_spectrum.eval.report import markdown_tables, merge_records, plot_records  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def main(paths: list[str]) -> int:
    records: list[dict] = []
    for p in paths:
        if p.endswith("_details.json"):  # per-trial NIAH answers, not records
            continue
        records += json.loads(Path(p).read_text())
    merged = merge_records(OUT / "quality.json", records)
    (OUT / "quality.md").write_text(markdown_tables(merged))
    for png in plot_records(merged, OUT):
        print(f"wrote {png}")
    print(f"wrote {OUT / 'quality.json'} ({len(merged)} records) and quality.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
