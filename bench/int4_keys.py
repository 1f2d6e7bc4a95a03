"""Which INT4 hurts a model: keys or values, per-token or per-channel scales?

A diagnostic beside the codec (its own quantisers, applied to K and/or V
separately, without the tier policy): every prompt token of a
WikiText-2 window (C=1024) is quantised one way, the next M=256 tokens are
scored on top (the PD perplexity protocol of `spectrumkv eval ppl`), and the
perplexity change against full precision is reported per variant:

* ``k4v4 token``: both per token, group = head_dim (the codec's plain INT4)
* ``k4v4 token had+g32``: Hadamard-rotated heads, groups of 32 (the codec's +had+g32)
* ``k4 token`` / ``v4 token``: only keys / only values in INT4
* ``k4 channel`` (KIVI): keys per channel over blocks of 64 consecutive tokens,
  values per token -- the same scale bytes per token at head_dim 64

    .venv/bin/python bench/int4_keys.py --model qwen2.5-coder-0.5b --windows 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_spectrum.codec import (  # noqa: E402
    dequantize,
    dequantize_channels,
    hadamard,
    quantize,
    quantize_channels,
)

OUT = Path(__file__).resolve().parent / "results"


def per_token(x: torch.Tensor, group: int | None = None, rotate: bool = False) -> torch.Tensor:
    """``x`` [T, H, D] through INT4 per token (and head) in groups along D."""
    d = x.shape[-1]
    h = hadamard(d).to(x.device) if rotate else None
    xf = x.float() @ h if rotate else x.float()
    out = dequantize(*quantize(xf, 4, group or d), 4, d)
    return out @ h.T if rotate else out


def per_channel(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``x`` [T, H, D] through INT4 per channel over blocks of ``block`` consecutive tokens."""
    d = x.shape[-1]
    return dequantize_channels(*quantize_channels(x.float(), 4, block), 4, d, block)


VARIANTS = {
    "k4v4 token": (per_token, per_token),
    "k4v4 token had+g32": (
        lambda k: per_token(k, 32, rotate=True),
        lambda v: per_token(v, 32, rotate=True),
    ),
    "k4 token": (per_token, None),
    "v4 token": (None, per_token),
    "k4 channel (KIVI), v4 token": (per_channel, per_token),
    "k4 channel (KIVI), v4 token had+g32": (
        per_channel,
        lambda v: per_token(v, 32, rotate=True),
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=256)
    args = ap.parse_args()

    from sglang_spectrum.eval.hf_bridge import continue_from_kv, prefill
    from sglang_spectrum.eval.ppl import load_wikitext, wikitext_windows
    from sglang_spectrum.models import load_model

    model, tok = load_model(args.model, attn_implementation="sdpa")
    wins = wikitext_windows(tok, load_wikitext(), args.context, args.continuation, args.windows)
    nll: dict[str, list[float]] = {"full": [], **{v: [] for v in VARIANTS}}
    for w in wins:
        kv = prefill(model, w[None, : args.context], obs_window=0)
        feed, targets = w[None, args.context : -1], w[args.context + 1 :]

        def score(keys, values, kv=kv, feed=feed, targets=targets) -> float:
            logits = continue_from_kv(
                model, keys, values, kv.layer_first_pos, kv.num_tokens, None, feed
            )
            return float(torch.nn.functional.cross_entropy(logits.float(), targets))

        nll["full"].append(score(kv.keys, kv.values))
        for name, (fk, fv) in VARIANTS.items():
            keys = [fk(k).to(k.dtype) if fk else k for k in kv.keys]
            values = [fv(v).to(v.dtype) if fv else v for v in kv.values]
            nll[name].append(score(keys, values))
        print(f"window done: full nll {nll['full'][-1]:.4f}", file=sys.stderr, flush=True)

    rows = []
    base = nll["full"]
    for name, vals in nll.items():
        deltas = [100 * (math.exp(a - b) - 1) for a, b in zip(vals, base)]
        mean = sum(deltas) / len(deltas)
        var = sum((d - mean) ** 2 for d in deltas) / max(1, len(deltas) - 1)
        rows.append(
            {
                "model": args.model,
                "variant": name,
                "ppl_delta_pct": mean,
                "stderr": math.sqrt(var / len(deltas)),
                "n": len(deltas),
                "context": args.context,
            }
        )
    print(f"\n{args.model}: perplexity change vs full, {len(wins)} windows")
    print("| variant | ppl change |\n|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ppl_delta_pct']:+.2f}% ±{r['stderr']:.2f} |")
    path = OUT / "int4_keys.json"
    old = json.loads(path.read_text()) if path.exists() else []
    old = [r for r in old if r["model"] != args.model] + rows
    path.write_text(json.dumps(old, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
