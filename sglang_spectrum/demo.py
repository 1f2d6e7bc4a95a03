"""The main job (`spectrumkv demo`).

Default: a real PD deployment on this machine (prefill server, decode server,
router; SGLang with ``--disaggregation-transfer-backend spectrum``), a few
prompts, and per request the full vs sent bytes, tier histogram, transfer
time and the answer. ``--codec-only`` runs the codec on a real prompt's KV
with transformers instead (no servers).
"""

from __future__ import annotations

import sys
import time


def codec_demo(model_name: str, budgets=(1.0, 0.5, 0.3)) -> int:
    import torch

    from .codec import decode_kv, pack_kv
    from .config import SpectrumConfig
    from .eval.hf_bridge import continue_from_kv, prefill
    from .eval.ppl import load_wikitext
    from .models import load_model

    print(f"[demo] loading {model_name} ...", file=sys.stderr)
    model, tok = load_model(model_name)
    text = load_wikitext()
    ids = tok(text[:20000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    context, cont = 1024, 128
    kv = prefill(model, ids[None, :context])
    feed, targets = ids[None, context : context + cont], ids[context + 1 : context + cont + 1]
    print(
        f"prompt: {context} tokens of WikiText-2, {len(kv.keys)} layers, "
        f"{kv.keys[0].shape[1]} KV heads x {kv.keys[0].shape[2]}"
    )
    header = (
        f"{'budget':>6} {'tiers':>5} {'sent/full bytes':>22} {'ratio':>6} "
        f"{'fp16/int8/int4/drop':>20} {'pack ms':>8} {'unpack ms':>9} {'ppl':>7}"
    )
    print(header)
    for tiers in ("3", "2"):
        for b in budgets:
            cfg = SpectrumConfig(budget=b, tiers=tiers)
            t0 = time.perf_counter()
            packed = pack_kv(kv.keys, kv.values, cfg, queries=kv.queries)
            wire = packed.to_bytes()
            t1 = time.perf_counter()
            keys, values, kept = decode_kv(wire, dtype=kv.keys[0].dtype)
            t2 = time.perf_counter()
            logits = continue_from_kv(model, keys, values, kv.layer_first_pos, context, kept, feed)
            nll = torch.nn.functional.cross_entropy(logits.float(), targets)
            c = packed.tier_counts
            hist = f"{c['fp16']}/{c['int8']}/{c['int4']}/{c['drop']}"
            print(
                f"{b:>6g} {tiers:>5} {len(wire):>10,}/{packed.full_nbytes:>11,} "
                f"{packed.bytes_ratio:>6.3f} {hist:>20} {1e3 * (t1 - t0):>8.1f} "
                f"{1e3 * (t2 - t1):>9.1f} {float(nll.exp()):>7.3f}"
            )
    return 0


def run_demo(args) -> int:
    if args.codec_only:
        return codec_demo(args.model)
    try:
        from .sglang_plugin.demo import pd_demo
    except ImportError as exc:  # the PD demo needs the SGLang plugin
        print(f"[demo] PD demo unavailable ({exc}); running the codec demo", file=sys.stderr)
        return codec_demo(args.model)
    return pd_demo(args.model, args.budget)
