"""Heterogeneous TP head slices: one shared tier map per head count (``pack_slices``, the
choice, "a") against each slice's own scores and allocation ("b"), in bytes and host work.

One prefill rank (TP 1, all ``kv_heads`` heads) feeds ``d`` decode ranks (``d`` in
``--decode-tp``), one slice of ``kv_heads / d`` heads each (``heads.prefill_slices``):

- ``a``: ``pack_slices(pools, heads=[...])``: scores over every head of the rank, one
  allocation per head count (the slice's budget), one header and checksum per slice;
- ``b``: ``pack_request`` on a contiguous copy of each slice's heads (the copy is not
  timed): its own scores (its heads only), allocation, header and checksum;
- ``a_rank``: the rank's single-rank tier map (allocated with the budget of every head)
  packed per slice: what sharing the rank's allocation itself would cost.

Per (d, budget, key scales): bytes sent (sum over slices), header bytes per slice, slices
over their own ``packed_size_bound``, tier agreement of a and b, host ms of the scoring +
allocation step (``plan``) and of the packing (``pack``), per call. Usage::

    OMP_NUM_THREADS=1 python bench/head_slices.py                 # CPU, torch path
    python bench/head_slices.py --device cuda --tokens 16384 --layers 32   # kernel path
"""

from __future__ import annotations

import argparse
import json
import time

import msgspec
import torch

from sglang_spectrum.codec import header_tier_map, pack_tiers, read_header
from sglang_spectrum.config import SpectrumConfig
from sglang_spectrum.heads import prefill_slices
from sglang_spectrum.transfer import pack_request, pack_slices, packed_size_bound


def make_pools(layers, heads, head_dim, tokens, device, seed=0):
    """bf16 K and V pools ``[tokens, H, D]`` per layer (slot = position): per-channel
    scales, per-token magnitudes, rare outliers."""
    gen = torch.Generator().manual_seed(seed)
    out = ([], [])
    for _ in range(layers):
        for pools, scale in zip(out, (2.0, 1.0)):
            chan = torch.exp(torch.randn(heads, head_dim, generator=gen))
            mag = torch.rand(tokens, 1, 1, generator=gen) * 3 + 0.1
            x = torch.randn(tokens, heads, head_dim, generator=gen) * chan * mag * scale
            x[torch.rand(x.shape, generator=gen) < 1e-3] *= 30.0
            pools.append(x.to(torch.bfloat16).to(device))
    return out


def region(tokens, layers, heads, head_dim, cfg, device):
    n = packed_size_bound(tokens, layers, heads, head_dim, torch.bfloat16, cfg)
    return torch.zeros(n, dtype=torch.uint8, device=device)


def measure(kp, vp, slots, cfg, d, reps):
    """One record for ``d`` decode ranks under ``cfg``."""
    layers, heads, head_dim = len(kp), kp[0].shape[1], kp[0].shape[2]
    t = slots.numel()
    device = kp[0].device
    slices = prefill_slices(heads, 1, 0, d)
    n = slices[0].num_heads
    outs = [region(t, layers, n, head_dim, cfg, device) for _ in slices]
    ranges = [s.src for s in slices]
    for _ in range(reps):
        a = pack_slices(kp, vp, slots, cfg, outs=outs, heads=ranges)
    a_header = read_header(outs[0][: a[0].nbytes].cpu())[0]
    a_tiers = header_tier_map(a_header)
    b_bytes, b_plan, b_pack, agree = 0, 0.0, 0.0, []
    for s in slices:
        nk = [k[:, s.src[0] : s.src[1]].contiguous() for k in kp]
        nv = [v[:, s.src[0] : s.src[1]].contiguous() for v in vp]
        out = region(t, layers, n, head_dim, cfg, device)
        for _ in range(reps):
            b = pack_request(nk, nv, slots, cfg, out=out)
        b_bytes += b.nbytes
        b_plan += b.timings_ms["plan"]  # of the last rep (warm)
        b_pack += b.timings_ms["total"] - b.timings_ms["plan"]  # of the last rep
        b_tiers = header_tier_map(read_header(out[: b.nbytes].cpu())[0])
        agree.append(float((b_tiers == a_tiers).float().mean()))
    whole = region(t, layers, heads, head_dim, cfg, device)
    single = pack_request(kp, vp, slots, cfg, out=whole)
    header, _ = read_header(whole[: single.nbytes].cpu())
    rank_bytes, over = 0, 0
    bound = packed_size_bound(t, layers, n, head_dim, torch.bfloat16, cfg)
    lay = msgspec.structs.replace(header.layout, num_kv_heads=n)
    for s in slices:  # a_rank: the whole rank's tier map, each slice packed with it
        keys = [k[slots][:, s.src[0] : s.src[1]].cpu() for k in kp]
        values = [v[slots][:, s.src[0] : s.src[1]].cpu() for v in vp]
        packed = pack_tiers(keys, values, lay, header_tier_map(header), header.policy)
        rank_bytes += packed.nbytes
        over += packed.nbytes > bound
    a_plan, a_total = a[0].timings_ms["plan"], a[0].timings_ms["total"]  # the last rep, as b
    return {
        "decode_tp": d,
        "slices": len(slices),
        "heads_per_slice": n,
        "budget": cfg.budget,
        "key_scales": cfg.key_scales,
        "full_bytes": single.full_nbytes,
        "single_rank_bytes": single.nbytes,
        "a_bytes": sum(r.nbytes for r in a),
        "b_bytes": b_bytes,
        "a_rank_bytes": rank_bytes,
        "a_rank_slices_over_bound": over,
        "header_bytes_per_slice": a[0].nbytes - a_header.payload_nbytes,
        "tier_agreement_a_b": min(agree),
        "a_plan_ms": a_plan,
        "a_pack_ms": a_total - a_plan,
        "b_plan_ms": b_plan,
        "b_pack_ms": b_pack,
        "path": a[0].path,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--decode-tp", default="1,2,4,8")
    ap.add_argument("--budgets", default="0.3,0.5")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON file for the records")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    kp, vp = make_pools(args.layers, args.kv_heads, args.head_dim, args.tokens, device)
    slots = torch.arange(args.tokens, device=device)
    records = []
    t0 = time.perf_counter()
    for key_scales in ("token", "channel"):
        for budget in (float(b) for b in args.budgets.split(",")):
            cfg = SpectrumConfig(budget=budget, allow_drop=False, key_scales=key_scales)
            for d in (int(x) for x in args.decode_tp.split(",")):
                rec = measure(kp, vp, slots, cfg, d, args.reps)
                records.append(rec)
                print(json.dumps(rec), flush=True)
    print(f"# {time.perf_counter() - t0:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
