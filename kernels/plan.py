"""Transfer plan: everything the pack and unpack kernels need besides the KV itself.

"Plan once, run many" (as FlashInfer's wrappers): a :class:`TransferPlan` is
built from the layout, the tier map and the request's slot indices, holds the
segment offsets of the wire format and a few small device tables, and is then
reused by any number of kernel launches (pack on the prefill side, unpack on
the decode side, benchmarks).

Work decomposition (shared by both kernels). The kept tokens are listed
tier-major, ascending position within a tier (a stable sort of the tier map),
so for tier ``k`` list index ``j`` is exactly the number of tier-``k`` tokens
before it. A layer ``l`` holding positions ``first[l]..T-1`` therefore keeps
tier-``k`` tokens ``j >= base[k, l]`` (the count of tier-``k`` tokens before
``first[l]``) and writes token ``j`` to row ``j - base[k, l]`` of its segment:
no per-token offset table is needed, only ``[3, L]`` scalars. A *row* of work
is one (token, KV head) pair: tier-``k`` row ``r`` is token ``r // H``, head
``r % H``, and its segment row is ``r - base[k, l] * H``. Each program handles
``block_rows`` consecutive rows of one tier for one (layer, K|V): grid
``(blocks, 2 * L)``, one launch for all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..codec import PACKED_TIERS, SEGMENT_ALIGN, KVLayout
from ..config import SpectrumConfigError

BLOCK_ELEMS = 4096  # elements of KV one program moves (8 KiB of bf16)
META_HEAD = 10  # meta[0:4] block starts, [4:7] list starts, [7:10] tokens per tier
# (for inspection: the kernels get these as scalar arguments, see pack.block_rows)
META_STRIDE = 4  # per (tier, layer): base, rows in segment, K offset, V offset


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _order_and_base(layout: KVLayout, tiers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions tier-major (stable sort) and the ``[3, L+1]`` base counts."""
    t = tiers.detach().cpu().to(torch.uint8).reshape(-1)
    order = torch.argsort(t, stable=True)
    counts = torch.bincount(t.long(), minlength=4)[: len(PACKED_TIERS)].tolist()
    cols = torch.tensor([*layout.layer_first_pos, layout.num_tokens], dtype=torch.int64)
    base, start = [], 0
    for n in counts:  # positions of one tier are ascending: count those before each first
        base.append(torch.searchsorted(order[start : start + n], cols))
        start += n
    return order[:start], torch.stack(base)


def _offsets(layout: KVLayout, base: torch.Tensor) -> tuple[list[int], int]:
    held = (base[:, -1:] - base[:, :-1]).tolist()  # [3][L] tokens per segment
    offsets, pos = [], 0
    for k, tier in enumerate(PACKED_TIERS):
        for n in held[k]:
            for kv in range(2):
                pos = _align(pos, SEGMENT_ALIGN)
                offsets.append(pos)
                pos += layout.seg_nbytes(tier, n, key=kv == 0)
    return offsets, pos


def segment_table(layout: KVLayout, tiers: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
    """Per-layer token counts and segment offsets, vectorised.

    Args:
        tiers: uint8 ``[T]`` tier map (any device).
    Returns:
        base: int64 ``[3, L+1]`` on CPU: column ``l < L`` holds the number of
            tokens of each packed tier before ``layer_first_pos[l]``; column
            ``L`` the total per tier.
        offsets, payload_nbytes: identical to :func:`codec.segment_offsets`.
    """
    _, base = _order_and_base(layout, tiers)
    return (base, *_offsets(layout, base))


def kernel_supported(layout: KVLayout, fp8_pools: bool = False) -> bool:
    """Whether the Triton kernels handle this layout (else use the torch codec), packed
    from its pools or unpacked into FP8 pools (``fp8_pools``) or others.

    They need a power-of-two head_dim >= 8 (16-byte rows, register tiles), a
    power-of-two group size and, with per-channel key scales, a power-of-two key
    block of at most 256 rows. Hadamard rotation is not fused with FP8 (source or
    destination pools): the torch codec handles that pair.
    """
    d, g, kb = layout.head_dim, layout.group_size, layout.key_block
    if layout.rotation == "hadamard" and (layout.fp8 or fp8_pools):
        return False
    blocks = kb == 0 or (kb & (kb - 1) == 0 and 2 <= kb <= 256)
    return blocks and d >= 8 and d & (d - 1) == 0 and g & (g - 1) == 0 and d % g == 0


@dataclass
class TransferPlan:
    """Precomputed addressing of one request's payload (see module docstring).

    Attributes:
        layout, tiers: what the plan was built for (tiers uint8 ``[T]`` on CPU).
        offsets, payload_nbytes: segment offsets and size (the header's).
        counts: kept tokens per packed tier ``(n_fp16, n_int8, n_int4)``.
        base: int64 ``[3, L+1]`` CPU, see :func:`segment_table`.
        block_rows: (token, head) rows per program.
        block_starts: first block of each tier and the total ``(0, b1, b2, b3)``.
        meta: int64 device table read by the kernels (layout in ``_meta``).
        positions: int64 ``[N]`` device: kept positions, tier-major.
        rows: int64 ``[N]`` device: pool slot of each listed token.
        gaps: int64 device: payload bytes between segments (zero padding).
        num_warps: warps per program of the pack/unpack kernels.
        launches: the launchers' own cache of what they derive from the plan (grid,
            trailing arguments, compile options), by launch kind: every later layer
            group of a chunk launches with the same ones.
    """

    layout: KVLayout
    tiers: torch.Tensor
    offsets: list[int]
    payload_nbytes: int
    counts: tuple[int, int, int]
    base: torch.Tensor
    block_rows: int
    block_starts: tuple[int, int, int, int]
    meta: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    gaps: torch.Tensor
    num_warps: int = 4
    launches: dict[tuple, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.meta.device

    def launch(self, key: tuple, build) -> Any:
        """The launchers' ``build()`` for ``key``, built once per plan (a ``Launch``, or
        None: nothing to launch)."""
        if key not in self.launches:
            self.launches[key] = build()
        return self.launches[key]

    @property
    def num_blocks(self) -> int:
        return self.block_starts[3]

    @property
    def list_starts(self) -> tuple[int, int, int]:
        n0, n1, _ = self.counts
        return (0, n0, n0 + n1)

    def tier_range(self, k: int, layer: int) -> tuple[int, int]:
        """List indices ``[lo, hi)`` of the tier-``k`` tokens that ``layer`` holds."""
        start = self.list_starts[k]
        return start + int(self.base[k, layer]), start + self.counts[k]

    def kept_nbytes(self) -> int:
        """Bytes of KV the pack reads from the pools (kept tokens, all layers, K and V; the
        pools' own bytes: 16-bit, or 1 per element for FP8 sources)."""
        held = self.base[:, -1:] - self.base[:, :-1]
        return int(held.sum()) * 2 * self.layout.row_nbytes(PACKED_TIERS[0])


def _meta(layout: KVLayout, base: torch.Tensor, offsets: list[int], starts, lists, counts):
    num_layers = layout.num_layers
    meta = torch.zeros(META_HEAD + 3 * num_layers * META_STRIDE, dtype=torch.int64)
    meta[0:4] = torch.tensor(starts)
    meta[4:7] = torch.tensor(lists)
    meta[7:10] = torch.tensor(counts)
    per = meta[META_HEAD:].view(3, num_layers, META_STRIDE)
    per[:, :, 0] = base[:, :-1]
    per[:, :, 1] = base[:, -1:] - base[:, :-1]
    per[:, :, 2:] = torch.tensor(offsets, dtype=torch.int64).view(3, num_layers, 2)
    return meta


def _gaps(layout: KVLayout, base: torch.Tensor, offsets: list[int], total: int) -> torch.Tensor:
    held = (base[:, -1:] - base[:, :-1]).tolist()
    ends = []
    for k, tier in enumerate(PACKED_TIERS):
        for n in held[k]:
            ends += [layout.seg_nbytes(tier, n, key=True), layout.seg_nbytes(tier, n, key=False)]
    gaps: list[int] = []
    for i, start in enumerate(offsets):
        nxt = offsets[i + 1] if i + 1 < len(offsets) else total
        gaps.extend(range(start + ends[i], nxt))
    return torch.tensor(gaps, dtype=torch.int64)


def _block_tables(
    layout: KVLayout,
    base: torch.Tensor,
    offsets: list[int],
    total: int,
    counts: tuple[int, int, int],
    block_rows: int,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Host tables of a plan: first block of each tier and the total, ``meta``, gaps."""
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + -(-n * layout.num_kv_heads // block_rows))
    lists = (0, counts[0], counts[0] + counts[1])
    meta = _meta(layout, base, offsets, starts, lists, counts)
    return starts, meta, _gaps(layout, base, offsets, total)


def _make_plan(
    layout: KVLayout,
    tiers: torch.Tensor,
    counts: tuple[int, int, int],
    block_rows: int,
    tables: tuple,
    positions: torch.Tensor,
    rows: torch.Tensor,
    num_warps: int,
) -> TransferPlan:
    """The plan of ``tables`` = (base, offsets, payload size, block starts, device meta,
    device gaps)."""
    base, offsets, total, starts, meta, gaps = tables
    return TransferPlan(
        layout=layout,
        tiers=tiers,
        offsets=offsets,
        payload_nbytes=total,
        counts=counts,
        base=base,
        block_rows=block_rows,
        block_starts=starts,
        meta=meta,
        positions=positions,
        rows=rows,
        gaps=gaps,
        num_warps=num_warps,
    )


def plan_transfer(
    layout: KVLayout,
    tiers: torch.Tensor,
    slots: torch.Tensor,
    block_elems: int = BLOCK_ELEMS,
    num_warps: int = 4,
) -> TransferPlan:
    """Build the :class:`TransferPlan` of one request.

    Args:
        layout: the request's :class:`KVLayout` (``kernel_supported`` must hold).
        tiers: uint8 ``[T]`` tier map (values of :class:`Tier`).
        slots: int ``[T]`` pool slot of each prompt position, on the pools' device.
        block_elems: KV elements per program (power of two >= head_dim).
        num_warps: warps per program.
    Returns:
        The plan; its tables live on ``slots.device`` (one host-to-device copy).
    """
    if not kernel_supported(layout):
        raise SpectrumConfigError(
            f"kernels need power-of-two head_dim >= 8, group size and key block (<= 256),"
            f" got head_dim={layout.head_dim} group_size={layout.group_size}"
            f" key_block={layout.key_block}"
        )
    tiers = tiers.detach().cpu().to(torch.uint8).reshape(-1)
    if tiers.numel() != layout.num_tokens or slots.numel() != layout.num_tokens:
        raise SpectrumConfigError(
            f"tier map ({tiers.numel()}) and slots ({slots.numel()}) must both have"
            f" {layout.num_tokens} entries"
        )
    order, base = _order_and_base(layout, tiers)
    offsets, total = _offsets(layout, base)
    counts = tuple(int(c) for c in base[:, -1])
    block_rows = max(1, block_elems // layout.head_dim)
    starts, meta, gaps = _block_tables(layout, base, offsets, total, counts, block_rows)
    kept = sum(counts)
    host = torch.cat([meta, order, gaps])
    dev = host.to(slots.device, non_blocking=False)
    meta_d, order_d, gaps_d = torch.split(dev, [meta.numel(), kept, gaps.numel()])
    rows = torch.index_select(slots.reshape(-1).to(torch.int64), 0, order_d)
    tables = (base, offsets, total, tuple(starts), meta_d, gaps_d)
    return _make_plan(layout, tiers, counts, block_rows, tables, order_d, rows, num_warps)


_UNIFORM: dict[tuple, tuple] = {}


def _uniform_tables(
    layout: KVLayout, counts: tuple[int, int, int], block_rows: int, device: torch.device
) -> tuple:
    """Host and device tables of a plan whose layers all hold every position: they
    depend only on the layout and the tier counts (cached; one pinned copy)."""
    key = (
        str(device),
        layout.top_bytes,
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
        layout.group_size,
        layout.key_block,
        layout.num_tokens,
        counts,
        block_rows,
    )
    hit = _UNIFORM.get(key)
    if hit is not None:
        return hit
    base = torch.zeros(len(PACKED_TIERS), layout.num_layers + 1, dtype=torch.int64)
    base[:, -1] = torch.tensor(counts, dtype=torch.int64)
    offsets, total = _offsets(layout, base)
    starts, meta, gaps = _block_tables(layout, base, offsets, total, counts, block_rows)
    host = torch.cat([meta, gaps])
    if device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    meta_d, gaps_d = torch.split(dev, [meta.numel(), gaps.numel()])
    hit = (base, offsets, total, tuple(starts), meta_d, gaps_d, host)
    if len(_UNIFORM) >= 256:
        _UNIFORM.clear()
    _UNIFORM[key] = hit
    return hit


def plan_from_counts(
    layout: KVLayout,
    tiers: torch.Tensor,
    counts: tuple[int, int, int],
    slots: torch.Tensor,
    block_elems: int = BLOCK_ELEMS,
    num_warps: int = 4,
) -> TransferPlan:
    """:func:`plan_transfer` for a layout whose layers all hold every position, built on
    the device: the tier counts (known on the host before the tier map is, see
    ``policy.waterfall_counts``) fix every size and table, the tier map itself
    stays on the device (one stable sort orders the kept tokens). No synchronisation.

    Args:
        tiers: uint8 ``[T]`` tier map on ``slots.device``.
        counts: tokens per packed tier ``(fp16, int8, int4)`` of ``tiers``.
        slots: int64 ``[T]`` pool slot of each position, on the pools' device.
    """
    if not kernel_supported(layout) or any(layout.layer_first_pos):
        raise SpectrumConfigError("plan_from_counts needs a kernel layout holding every position")
    counts = tuple(int(c) for c in counts)
    block_rows = max(1, block_elems // layout.head_dim)
    tables = _uniform_tables(layout, counts, block_rows, slots.device)[:6]
    kept = sum(counts)
    order = torch.argsort(tiers.reshape(-1), stable=True)[:kept]
    rows = torch.index_select(slots.reshape(-1), 0, order)
    return _make_plan(layout, tiers, counts, block_rows, tables, order, rows, num_warps)
