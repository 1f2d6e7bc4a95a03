"""Codec byte accounting and reconstruction error on real KV (CPU).

    .venv/bin/python bench/codec.py [--models smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m]

Writes bench/results/codec.json and bench/results/codec.md:
- bytes per token per tier (one layer, one KV head, K+V) for head_dim 64/128/256,
  default group size (= head_dim) and group 32, plus the ratio to FP16;
- relative reconstruction error (||x - x_hat|| / ||x||, keys and values
  separately) per tier on a real model's prompt KV (1024 WikiText-2 tokens),
  with and without the Hadamard rotation, and the INT4 error against the
  quantiser's own bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_spectrum.codec import KVLayout, decode_rows, encode_rows  # noqa: E402
from sglang_spectrum.policy import Tier  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def byte_table() -> list[dict]:
    rows = []
    for head_dim in (64, 128, 256):
        for group in (head_dim, 32):
            layout = KVLayout(1, 1, head_dim, "bfloat16", group, 1, [0])
            fp16 = 2 * layout.row_nbytes(Tier.FP16)
            for tier in (Tier.FP16, Tier.INT8, Tier.INT4):
                b = 2 * layout.row_nbytes(tier)
                rows.append(
                    {
                        "head_dim": head_dim,
                        "group_size": group,
                        "tier": tier.name,
                        "bytes_per_token_per_kv_head": b,
                        "ratio_to_fp16": b / fp16,
                    }
                )
    return rows


def error_table(model_name: str, tokens: int = 1024) -> list[dict]:
    from sglang_spectrum.eval.hf_bridge import prefill
    from sglang_spectrum.eval.ppl import load_wikitext
    from sglang_spectrum.models import load_model

    model, tok = load_model(model_name)
    ids = tok(load_wikitext()[:40000], return_tensors="pt", add_special_tokens=False).input_ids
    kv = prefill(model, ids[:, :tokens])
    head_dim = kv.keys[0].shape[-1]
    rows = []
    for rotation in ("none", "hadamard"):
        for group in (head_dim, 32):
            layout = KVLayout(1, kv.keys[0].shape[1], head_dim, "bfloat16", group, 1, [0], rotation)
            for tier in (Tier.INT8, Tier.INT4):
                for name, xs in (("K", kv.keys), ("V", kv.values)):
                    num = den = 0.0
                    for x in xs:
                        x16 = x.to(torch.bfloat16)
                        out = decode_rows(encode_rows(x16, tier, layout), x.shape[0], tier, layout)
                        num += float(((out - x16.float()) ** 2).sum())
                        den += float((x16.float() ** 2).sum())
                    rows.append(
                        {
                            "model": model_name,
                            "tensor": name,
                            "tier": tier.name,
                            "rotation": rotation,
                            "group_size": group,
                            "rel_error": (num / den) ** 0.5,
                            "tokens": tokens,
                        }
                    )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m")
    args = ap.parse_args()
    result = {"bytes": byte_table(), "errors": []}
    for m in args.models.split(","):
        result["errors"] += error_table(m)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "codec.json").write_text(json.dumps(result, indent=1))
    lines = [
        "## Bytes per token per tier (one layer, one KV head, K+V)",
        "",
        "| head_dim | group | FP16 | INT8 | INT4 |",
        "|---|---|---|---|---|",
    ]
    by = {}
    for r in result["bytes"]:
        by.setdefault((r["head_dim"], r["group_size"]), {})[r["tier"]] = r
    for (d, g), t in by.items():
        cells = [
            f"{t[x]['bytes_per_token_per_kv_head']} B ({t[x]['ratio_to_fp16']:.3f})"
            for x in ("FP16", "INT8", "INT4")
        ]
        lines.append(f"| {d} | {g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Plus 1 byte per token for the tier map and a fixed header.",
        "",
        "## Relative reconstruction error ||x - x_hat|| / ||x|| on real prompt KV "
        "(1024 WikiText-2 tokens)",
        "",
        "| model | tensor | tier | rotation | group | rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["errors"]:
        lines.append(
            f"| {r['model']} | {r['tensor']} | {r['tier']} | {r['rotation']} | "
            f"{r['group_size']} | {r['rel_error']:.4f} |"
        )
    (OUT / "codec.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
