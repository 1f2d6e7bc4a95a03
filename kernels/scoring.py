"""Fused key-norm importance straight from the K pools.

Same scores as :func:`scoring.key_norm_scores` on the gathered keys (per-layer
rank of the head-averaged L2 norm, ``(rank + 1) / n``, 1 = smallest norm), but
the norms come from one launch over all layers that reads only the keys, with
no gathered copy. Norms agree with torch to float32 rounding (another summation
order), so two tokens whose norms tie within ~1e-7 may swap ranks. FP8 pools (uint8
bits) are read as their real values ``fp8 * k_scale`` of each layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..fp8 import FP8_KIND, FP8Pool
from ._common import TL_DTYPES, launch_options, pointer_table
from ._fp8 import from_fp8, scale_table


@triton.jit
def _key_norm_kernel(
    ptrs,
    slots,
    first,
    out,
    scales,  # float32 [2L]: FP8 K scale of layer l at l (read when FP8)
    num_tokens,
    DT: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    FP8: tl.constexpr = 0,  # uint8 pools of FP8 bits: 1 e4m3fn, 2 e5m2
):
    layer = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    ok = (t >= tl.load(first + layer)) & (t < num_tokens)
    addr = tl.multiple_of(tl.load(ptrs + layer), 16)
    pool = tl.multiple_of(addr.to(tl.pointer_type(DT)), 16)
    slot = tl.load(slots + t, mask=ok, other=0)
    h = tl.arange(0, HP)
    off = (slot[:, None, None] * H + h[None, :, None]) * D + tl.arange(0, D)[None, None, :]
    mask = ok[:, None, None] & (h < H)[None, :, None]
    x = tl.load(pool + off, mask=mask, other=0.0)
    if FP8:
        x = from_fp8(x, FP8) * tl.load(scales + layer)
    else:
        x = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 2))  # [BT, HP]
    tl.store(out + layer * num_tokens + t, tl.sum(norm, 1) / H, mask=ok)


def _key_norms(
    k_pools: Sequence[torch.Tensor],
    ptrs: torch.Tensor,
    slots: torch.Tensor,
    first: torch.Tensor,
    fp8: FP8Pool | None = None,
) -> torch.Tensor:
    """Run the key-norm kernel: float32 ``[L, T]`` head-averaged key L2 norms on the pools'
    device (``ptrs``: the pools' pointer table; ``first``: int64 ``[L]`` first position
    each layer holds; positions before it are not written; ``fp8``: what uint8 FP8 pools
    hold)."""
    device = k_pools[0].device
    num_layers, num_tokens = len(k_pools), int(slots.numel())
    _, heads, head_dim = k_pools[0].shape
    kind = FP8_KIND[fp8.name] if fp8 is not None else 0
    scales = scale_table(fp8.scales if fp8 is not None else (), num_layers, device)
    hp = triton.next_power_of_2(heads)
    bt = max(1, 4096 // (hp * head_dim))
    norms = torch.empty(num_layers, num_tokens, dtype=torch.float32, device=device)
    _key_norm_kernel[(triton.cdiv(num_tokens, bt), num_layers)](
        ptrs,
        slots.to(device=device, dtype=torch.int64),
        first,
        norms,
        scales,
        num_tokens,
        DT=TL_DTYPES[k_pools[0].dtype],
        H=heads,
        HP=hp,
        D=head_dim,
        BT=bt,
        FP8=kind,
        **launch_options(device),
    )
    return norms


def key_norm_scores_from_pools(
    k_pools: Sequence[torch.Tensor],
    slots: torch.Tensor,
    layer_first_pos: Sequence[int],
    fp8: FP8Pool | None = None,
) -> torch.Tensor:
    """Key-norm scores of one request, float32 ``[L, T]`` on the pools' device.

    Args:
        k_pools: per layer ``[num_slots, H, D]`` contiguous K pools.
        slots: int ``[T]`` pool slot of each prompt position.
        layer_first_pos: first position each layer holds (0 at positions before).
        fp8: uint8 FP8 pools: their dtype and per-layer scales (real = fp8 * scale).
    """
    device = k_pools[0].device
    num_tokens = int(slots.numel())
    first = torch.tensor(list(layer_first_pos), dtype=torch.int64).to(device)
    norms = _key_norms(k_pools, pointer_table(k_pools, device), slots, first, fp8)
    out = torch.zeros_like(norms)
    for f in sorted(set(layer_first_pos)):  # layers sharing a window rank in one batch
        rows = [i for i, g in enumerate(layer_first_pos) if g == f]
        n = num_tokens - f
        if n <= 0:
            continue
        idx = torch.tensor(rows, device=device)
        order = torch.argsort(norms[idx, f:], dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order, dtype=torch.float32)
        ranks.scatter_(
            1,
            order,
            torch.arange(n, dtype=torch.float32, device=device).expand_as(ranks).contiguous(),
        )
        out[idx, f:] = (ranks + 1) / n
    return out


_FIRST: dict[tuple, torch.Tensor] = {}


def key_norm_scores_all_layers(
    k_pools: Sequence[torch.Tensor],
    slots: torch.Tensor,
    fp8: FP8Pool | None = None,
) -> torch.Tensor:
    """:func:`key_norm_scores_from_pools` when every layer holds every position (SGLang's
    MHA pool), merged as ``scoring.score_tokens`` merges layers: float32 ``[T]``
    ``sum_l rank_l / L`` on the pools' device, before the sink / recent lift.
    ``fp8``: what uint8 FP8 pools hold.

    No host copies (pointer tables cached with the pools), one batched sort."""
    device = k_pools[0].device
    num_layers, num_tokens = len(k_pools), int(slots.numel())
    key = (str(device), num_layers)
    first = _FIRST.get(key)
    if first is None:
        first = _FIRST[key] = torch.zeros(num_layers, dtype=torch.int64, device=device)
    norms = _key_norms(k_pools, _pointers(k_pools, device), slots, first, fp8)
    order = torch.argsort(norms, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(norms)
    steps = torch.arange(1, num_tokens + 1, dtype=torch.float32, device=device) / num_tokens
    ranks.scatter_(1, order, steps.expand_as(ranks))
    return ranks.sum(dim=0) / num_layers


_PTRS: dict[tuple, torch.Tensor] = {}


def _pointers(pools: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Cached device table of the pools' data pointers (SGLang's pools live long)."""
    key = (str(device), *(t.data_ptr() for t in pools))
    hit = _PTRS.get(key)
    if hit is None:
        if len(_PTRS) >= 64:
            _PTRS.clear()
        hit = _PTRS[key] = pointer_table(pools, device)
    return hit
