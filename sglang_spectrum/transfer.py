"""The request path: pack one request straight from the KV pools into a send region,
validate and unpack a received buffer into the pools (SGLang-free).

The SGLang backend, the benchmark (``bench/request_path.py``) and the GPU tests
call exactly these two functions (:func:`pack_slices` under heterogeneous TP, below)::

    bound = packed_size_bound(T, L, H, D, dtype, config)      # region sizes
    info = pack_request(k_pools, v_pools, slots, config, out=send_region)
    # ... out[:info.nbytes] travels; info.checksum goes along in the notification
    unpack_request(recv_region, k_pools, v_pools, slots, expected_checksum=info.checksum)

Two implementations write the same wire format (:mod:`.codec`):

- ``"torch"`` (CPU pools, or no Triton): the reference: gather, ``score_tokens``,
  ``allocate_tiers``, ``pack_tiers`` / ``read_header`` + ``iter_decoded_layers``.
- ``"kernels"`` (CUDA pools, Triton importable): scoring, allocation and planning
  on the GPU (see :func:`_pack_kernels`); only the sizes, the tier map and the
  checksum cross to the host (the header needs them).

Every pool holds every position (SGLang's MHA pool), so the layout has
``layer_first_pos = [0] * L`` and every token costs the same per tier.

FP8 pools (SGLang ``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``) are passed as SGLang stores
them, uint8 ``[num_slots, H, D]`` per layer, with ``fp8=FP8Pool.of(dtype, L, k_scales,
v_scales)`` saying what the bytes mean (:mod:`.fp8`). Packing from them sends the FP8
bytes as the top tier (lossless) and INT4 (never INT8) below; unpacking into them stores
``(x / scale)`` saturated to FP8 with the *receiver's* scales. Every pair of source and
destination pool dtypes is supported (:func:`pool_pair_problem` says so for a handshake):
16-bit -> FP8 (the asymmetric deployment), FP8 -> FP8 (byte-identical top tier when
dtype and scales agree), FP8 -> 16-bit, e4m3 <-> e5m2 (converted through the real values).
The conversions out of an FP8 source (all but the byte copy) run the kernels on the devices
where they are proven (``receive.FP8_CONVERSION_KERNEL_DEVICES``: CPU and CUDA).

Heterogeneous attention TP (prefill TP ``p`` != decode TP ``d``): each rank's pools hold
its own KV heads; :mod:`.heads` says which head range of which prefill rank goes to which
head range of which decode rank (SGLang's mooncake mapping). A prefill rank packs its
slices with ``pack_slices(..., outs=[...], heads=[s.src for s in prefill_slices(...)])``
(one buffer per decode rank, each bounded by ``packed_size_bound`` of its head count), a
decode rank unpacks each buffer it receives with ``unpack_request(..., heads=s.dst)``.
Head ranges are read and written in place (the kernels take a head offset). The layout
of a slice's buffer has the slice's head count (a complete, ordinary buffer); a decode
range of another count is refused before any write.

Design choice, measured (``bench/head_slices.py``, results in
``bench/results/head_slices_cpu.json``: CPU torch path, 8 layers x 8 KV heads x 128,
2048 tokens, TP 1 -> 2/4/8): one tier map per head count shared by the slices (a: scores
over every head of the prefill rank, one allocation with the budget of a slice's head
count, each slice its own header and checksum) rather than each slice its own scores and
allocation (b):

- bytes: identical (the waterfall's tier counts depend on the slice's costs and budget
  only, never on the scores), at every budget and TP; each slice carries its own header
  either way (it goes to its own decode rank): 2560 B per slice here (T + ~500 B),
  0.01-0.1 % of a slice. Sharing the *rank's* allocation instead (its budget) would add
  the extra headers on top: up to +25 KB at TP 8 and every slice over its own bound with
  per-token keys (4/4 at TP 4, 8/8 at TP 8);
- host work: (a) scores and allocates once per request (39-91 ms here, no trend with d:
  a shared 2-core machine's noise), (b) once per slice (42-60 ms at d = 1, 69-178 ms at
  d = 8); packing is the same work per slice in both. On the kernel path (a) also
  synchronises once for all slices, (b) once per slice;
- consistency: with (a) a token has the same tier in every decode rank's heads (as a
  single-rank transfer gives it); (b)'s maps differ on 3-7 % of the tokens.

Streams and threads: everything runs on the caller's current CUDA stream
(``with torch.cuda.stream(s): pack_request(...)`` packs on ``s``); the
functions return once the bytes are in ``out`` / the pools (the stream is
synchronised). Module-level caches (layouts, plan tables) are guarded by a lock,
so pack and unpack may run on other threads than the scheduler's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .codec import (
    PackedHeader,
    count_tiers,
    encode_header,
    header_nbytes,
    measure_tier_errors,
    pack_tiers,
    token_budget,
)
from .config import SpectrumConfig, SpectrumConfigError
from .fp8 import FP8Pool, dequantize_fp8, pool_bytes
from .policy import (
    TIER_NAMES,
    Tier,
    allocate_tiers,
    tiers_from_ranks,
    waterfall_counts,
)
from .pools import as_slots, check_heads, check_pools, kernels_for, num_heads, on_device, sync
from .receive import unpack_request
from .scoring import lift_sinks_and_recent, score_tokens
from .sizes import (
    PART_ALIGN,
    _budget,
    _dtype_name,
    _Layout,
    _layout_info,
    packed_size_bound,
    part_offset,
    pool_pair_problem,
)

__all__ = [
    "PART_ALIGN",
    "FP8Pool",
    "PackedRequest",
    "pack_request",
    "pack_slices",
    "packed_size_bound",
    "part_offset",
    "pool_pair_problem",
    "unpack_request",
]


@dataclass(frozen=True)
class PackedRequest:
    """What :func:`pack_request` (or one slice of :func:`pack_slices`) wrote.

    Attributes:
        nbytes: bytes written at ``out[:nbytes]`` (prefix + header + padding + payload).
        checksum: payload checksum (``codec.payload_checksum`` value), as in the header.
        num_tokens: tokens packed (``len(slots)``).
        full_nbytes: 16-bit bytes of those tokens and heads (the budget's denominator).
        tier_counts: tokens per tier name (``fp16``, ``int8``, ``int4``, ``drop``; ``fp16``
            is the top tier: the FP8 bytes for FP8 pools).
        path: ``"kernels"`` or ``"torch"``: which implementation packed.
        timings_ms: host wall clock of the steps (``plan``, ``pack``, ``total``, ...); of
            the whole call (every slice) for :func:`pack_slices`. The kernel path adds
            ``wait`` (blocked on the device: its synchronisations) and ``host``
            (``total - wait``: the caller's own work).
        heads: the pools' head range packed, ``(h0, h1)``; None: every head.
        tier_map: uint8 ``[T]`` on the pools' device: the tier of each packed position
            (what ``tiers=`` takes to pack other layers of the same tokens alike).
        slots: int64 ``[T]`` the packed slots on the pools' device, range-checked against
            pools of ``pool_slots`` slots (the ``slots`` given, when they were already
            that).
        pool_slots: slots per pool of the pools packed.
    """

    nbytes: int
    checksum: int
    num_tokens: int
    full_nbytes: int
    tier_counts: dict[str, int]
    path: str
    timings_ms: dict[str, float]
    heads: tuple[int, int] | None = None
    tier_map: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    pool_slots: int = 0


@dataclass
class ChunkTiers:
    """A tier map chosen once, to pack other layers of the same tokens (the same slots)
    with: a layer-pipelined prefill's later groups of a chunk, ``pack_request(...,
    tiers=ChunkTiers.of(first_group_info))``. Plan once, pack many: the map's counts are
    known on the host (no count readback per part), the slots the first group range-checked
    are not checked again when a later group passes that very tensor (no readback either),
    and on the kernel path the plans and the header's host copy of the map that one group
    built serve the next ones of the same layout.

    Attributes:
        tier_map: uint8 ``[T]`` on the pools' device (:attr:`PackedRequest.tier_map`).
        counts: positions at ``(fp16, int8, int4)`` in ``tier_map``.
        slots: int64 ``[T]`` device slots already range-checked against pools of
            ``pool_slots`` slots (:attr:`PackedRequest.slots`), or None.
        pool_slots: see ``slots``.
        host_map: the map's bytes, once read back for a header (None before).
        plans: the kernel plans built for this map (one per layout packed).
        parts: per call shape (config, layers, heads, dtype), what the input checks
            derived for the first part of that shape (the slices' layouts and bounds):
            a later part checks only its pools and ``out``.
    """

    tier_map: torch.Tensor
    counts: tuple[int, int, int]
    slots: torch.Tensor | None = None
    pool_slots: int = 0
    host_map: bytes | None = None
    plans: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)

    @classmethod
    def of(cls, info: PackedRequest) -> ChunkTiers:
        """The map ``info`` was packed with (and the slots it checked)."""
        c = info.tier_counts
        return cls(info.tier_map, (c["fp16"], c["int8"], c["int4"]), info.slots, info.pool_slots)

    def checked(self, slots: Any, pool_slots: int) -> bool:
        """Whether ``slots`` is the very tensor this map's slots check passed for pools of
        ``pool_slots`` slots."""
        return slots is self.slots and pool_slots == self.pool_slots

    def plan_for(self, layout: Any) -> Any:
        """A plan built for ``layout`` (layers, heads, dtype, scales alike), or None."""
        return next((p for p in self.plans if p.layout == layout), None)


# --------------------------------------------------------------------------- pack


def _sent_config(config: SpectrumConfig, context: int) -> SpectrumConfig:
    """The allocation config of the sent tokens: sinks are the first ``config.sinks``
    positions of the whole prompt, so ``context`` earlier positions take them."""
    sinks = max(0, config.sinks - context)
    return config if sinks == config.sinks else config.with_(sinks=sinks)


def pack_request(
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    slots: torch.Tensor,
    config: SpectrumConfig,
    *,
    out: torch.Tensor,
    context_slots: torch.Tensor | None = None,
    fp8: FP8Pool | None = None,
    heads: tuple[int, int] | None = None,
    tiers: torch.Tensor | ChunkTiers | None = None,
) -> PackedRequest:
    """Score, allocate and pack one request from the pools straight into ``out``.

    Args:
        k_pools, v_pools: per layer ``[num_slots, kv_heads, head_dim]`` (SGLang's MHA
            pool), contiguous, bf16/fp16/fp32, or FP8 (uint8 as SGLang stores it, or
            float8) with ``fp8``; CPU or CUDA.
        slots: int ``[T]``: pool slots of the positions to send, in position order.
        config: budget, tiers, allocator, codec options.
        out: uint8 ``[>= packed_size_bound(...)]`` on the pools' device (the send region;
            the bound of the packed heads' count); the whole buffer is written to
            ``out[:nbytes]``.
        context_slots: int ``[P]``: slots of the ``P`` positions before ``slots`` that the
            receiver already holds: scored with the sent ones (sinks are the first
            ``config.sinks`` positions of the whole prompt) but not packed. Not read when
            ``tiers`` is given (nothing is scored).
        fp8: FP8 pools: ``FP8Pool.of(pool.dtype, L, k_scales, v_scales)`` (SGLang: the
            pool's float8 ``dtype``, per layer ``k_scale_float`` / ``v_scale_float`` or
            None). Tiers: the FP8 bytes (top tier, lossless), INT4 of the scaled values
            (tier mode ``"3"``); the scales travel in the header. The budget stays
            relative to the 16-bit KV: 0.5 and above send every token in FP8.
        heads: pack only heads ``[h0, h1)`` of the pools (heterogeneous TP: the ``src`` of
            a :class:`.heads.HeadSlice`), read in place; the buffer's layout has ``h1 -
            h0`` heads. Tokens are scored over every head of the pools (see
            :func:`pack_slices`). None: every head.
        tiers: uint8 ``[T]``: pack with this tier map (a :attr:`PackedRequest.tier_map`
            of the same tokens) instead of scoring and allocating: a layer-pipelined
            prefill packs every layer group of a chunk with the map its first group
            chose (``k_pools``/``v_pools`` are then that group's layers), or a
            :class:`ChunkTiers` of such a map (the same slots: its counts, plans and host
            copy are reused, and its checked ``slots`` tensor, passed again, is not read
            back). None: score and allocate under ``config``.

    Returns:
        :class:`PackedRequest`. Runs on the current CUDA stream and returns once the
        bytes are in ``out``. Never drops tokens when ``config.allow_drop`` is False.

    Raises:
        SpectrumConfigError: bad pools, slots, head range, ``out`` or a budget that cannot
            hold the sinks.
    """
    return pack_slices(
        k_pools,
        v_pools,
        slots,
        config,
        outs=[out],
        heads=[heads],
        context_slots=context_slots,
        fp8=fp8,
        tiers=tiers,
    )[0]


@dataclass
class _Request:
    """One request to pack: validated inputs shared by its slices."""

    k_pools: list[torch.Tensor]  # per layer [num_slots, HP, D] (uint8 bits for FP8)
    v_pools: list[torch.Tensor]
    sent: torch.Tensor  # int64 [T] slots packed
    all_slots: torch.Tensor  # int64 [P + T] slots scored (context first)
    cfg: SpectrumConfig  # the allocation's (sinks of the sent tokens)
    context: int  # P
    full: _Layout  # the layout of every head of the pools (scores, optimal's errors)
    scores: torch.Tensor | None = None  # float32 [T] once computed
    errors: torch.Tensor | None = None  # float64 [T, 4] (optimal allocator) once computed
    given: torch.Tensor | None = None  # uint8 [T] tier map given by the caller (tiers=)
    chosen: ChunkTiers | None = None  # ... as a ChunkTiers (counts, plans, host copy)


@dataclass
class _Slice:
    """One packed buffer: a head range (None: every head) into its own ``out``."""

    heads: tuple[int, int] | None
    out: torch.Tensor  # uint8 [>= bound], flat
    info: _Layout  # the slice's layout (its head count)

    def rows(self, pool: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        """``[T, H_slice, D]`` gathered rows of the slice's heads."""
        return pool[sent] if self.heads is None else pool[sent, self.heads[0] : self.heads[1]]


def pack_slices(
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    slots: torch.Tensor,
    config: SpectrumConfig,
    *,
    outs: Sequence[torch.Tensor],
    heads: Sequence[tuple[int, int] | None],
    context_slots: torch.Tensor | None = None,
    fp8: FP8Pool | None = None,
    tiers: torch.Tensor | ChunkTiers | None = None,
) -> list[PackedRequest]:
    """Pack one request as several buffers, heads ``heads[i]`` of the pools into
    ``outs[i]`` (heterogeneous TP: a prefill rank's :func:`.heads.prefill_slices`, one
    buffer per decode rank). Returns one :class:`PackedRequest` per slice, in order.

    Args:
        k_pools, v_pools, slots, config, context_slots, fp8, tiers: as
            :func:`pack_request` (``tiers``: every slice gets that map).
        outs: per slice a contiguous uint8 ``[>= packed_size_bound(T, L, h1 - h0, D,
            dtype, config)]`` send region on the pools' device.
        heads: per slice ``(h0, h1)``, heads of the pools (``HeadSlice.src``), or None
            (every head).

    Every slice is packed with the one tier map of its head count: tokens are scored once
    over every head of the pools (the prefill rank's; and the ``optimal`` allocator's
    errors), then allocated once per head count with the budget of that many heads (so a
    slice fits ``packed_size_bound`` of its heads and ``budget`` of its 16-bit bytes like
    any request). A slice's buffer is a complete one (header with its own head count,
    tier map and checksum): :func:`unpack_request` writes it into the receiver's head
    range. ``pack_request(..., heads=h)`` gives the very bytes of ``h``'s slice here
    (SGLang's mapping gives every slice of a rank the same head count: one allocation).
    On the kernel path the slices share one synchronisation.
    """
    t0 = time.perf_counter()
    if not isinstance(config, SpectrumConfig):
        raise SpectrumConfigError(f"config must be a SpectrumConfig, got {type(config)}")
    ref = check_pools(k_pools, v_pools, SpectrumConfigError, fp8)
    device, num_slots, pool_heads = ref.device, int(ref.shape[0]), int(ref.shape[1])
    if fp8 is None:
        dtype, scales = _dtype_name(ref.dtype), None
    else:  # the kernels and the reference read the FP8 bits as uint8
        k_pools, v_pools = pool_bytes(k_pools), pool_bytes(v_pools)
        dtype, scales = fp8.name, tuple(fp8.scales)
    chosen = tiers if isinstance(tiers, ChunkTiers) else None
    if chosen is not None and chosen.checked(slots, num_slots):
        sent = slots  # range-checked when the map was chosen: no readback per part
    else:
        sent = as_slots(slots, "slots", num_slots, device, SpectrumConfigError)
    if sent.numel() < 1:
        raise SpectrumConfigError("cannot pack a request of 0 tokens")
    context, all_slots = 0, sent
    if context_slots is not None and tiers is None:  # only scoring reads the context
        ctx = as_slots(context_slots, "context_slots", num_slots, device, SpectrumConfigError)
        context = int(ctx.numel())
        all_slots = torch.cat([ctx, sent]) if context else sent
    if len(outs) != len(heads) or not outs:
        raise SpectrumConfigError(f"{len(outs)} outs for {len(heads)} head ranges (need >= 1)")
    t, num_layers, head_dim = int(sent.numel()), len(k_pools), int(ref.shape[2])

    def layout(n: int) -> _Layout:
        return _layout_info(t, num_layers, n, head_dim, dtype, config, scales)

    def shape() -> tuple:  # per slice (head range, layout, bound); the pools' layout
        specs = []
        for h in heads:
            h = check_heads(h, pool_heads, SpectrumConfigError)
            n = num_heads(h, pool_heads)
            bound = packed_size_bound(t, num_layers, n, head_dim, dtype, config)
            specs.append((h, layout(n), bound))
        return config, specs, layout(pool_heads)

    if chosen is not None and all(h is None or type(h) is tuple for h in heads):
        # a later part of a known shape: only its pools and out are new
        key = (id(config), t, num_layers, pool_heads, head_dim, dtype, scales, *heads)
        hit = chosen.parts.get(key)
        if hit is None or hit[0] is not config:
            hit = chosen.parts[key] = shape()
    else:
        hit = shape()
    _, specs, full = hit
    slices = []
    for out, (h, info, bound) in zip(outs, specs):
        if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.device != device:
            raise SpectrumConfigError(f"out must be a uint8 tensor on {device}")
        if not out.is_contiguous():
            raise SpectrumConfigError("out must be contiguous")
        if out.numel() < bound:
            n = info.layout.num_kv_heads
            raise SpectrumConfigError(
                f"out holds {out.numel()} bytes, a request of {t} tokens and {n} KV heads"
                f" needs up to {bound} (packed_size_bound)"
            )
        slices.append(_Slice(h, out if out.dim() == 1 else out.reshape(-1), info))
    cfg = _sent_config(config, context)
    req = _Request(list(k_pools), list(v_pools), sent, all_slots, cfg, context, full)
    if tiers is not None:
        req.chosen = chosen
        given = chosen.tier_map if chosen is not None else tiers
        if not (isinstance(given, torch.Tensor) and given.dtype == torch.uint8):
            raise SpectrumConfigError("tiers must be a uint8 tensor (a PackedRequest.tier_map)")
        if given.numel() != t:
            raise SpectrumConfigError(f"tiers holds {given.numel()} positions, slots {t}")
        ready = given.dim() == 1 and given.device == device
        req.given = given if ready else given.reshape(-1).to(device)
    kern = kernels_for(device)
    if kern is not None and all(kern.kernel_supported(s.info.layout) for s in slices):
        with on_device(device):  # Triton launches on the current device: the pools'
            return _pack_kernels(kern, req, slices, t0)
    return _pack_torch(req, slices, t0)


def _scores(req: _Request) -> torch.Tensor:
    """float32 ``[T]`` reference scores of the sent positions over every head of the pools
    (whole prompt scored; FP8 keys by their real values), computed once per request."""
    if req.scores is None:
        lay = req.full.layout
        keys = [k[req.all_slots] for k in req.k_pools]
        if lay.fp8:
            keys = [
                dequantize_fp8(k, lay.wire_dtype, lay.scale(i, True)) for i, k in enumerate(keys)
            ]
        scores = score_tokens(keys, sinks=req.cfg.sinks, window=req.cfg.window)
        req.scores = scores[req.context :]
    return req.scores


def _errors(req: _Request) -> torch.Tensor | None:
    """The ``optimal`` allocator's float64 ``[T, 4]`` tier errors over every head (once);
    None for the other allocators."""
    if req.cfg.method != "spectrum" or req.cfg.allocator != "optimal":
        return None
    if req.errors is None:
        keys = [k[req.sent] for k in req.k_pools]
        values = [v[req.sent] for v in req.v_pools]
        req.errors = measure_tier_errors(keys, values, req.full.layout)
    return req.errors


def _reference_tiers(req: _Request, info: _Layout) -> torch.Tensor:
    """uint8 ``[T]`` CPU tier map of the reference allocator for ``info``'s head count
    (the caller's map when one was given)."""
    if req.given is not None:
        return req.given.cpu()
    lay = info.layout
    budget = token_budget(lay, req.cfg)
    return allocate_tiers(_scores(req), lay.token_costs(), budget, req.cfg, _errors(req), lay.fp8)


def _pack_torch(req: _Request, slices: list[_Slice], t0: float) -> list[PackedRequest]:
    """The reference: gather, score, ``allocate_tiers``, ``pack_tiers``, copy into out."""
    tiers = {}
    for s in slices:
        n = s.info.layout.num_kv_heads
        if n not in tiers:
            tiers[n] = _reference_tiers(req, s.info)
    t1 = time.perf_counter()
    results = []
    for s in slices:
        lay = s.info.layout
        keys = [s.rows(k, req.sent) for k in req.k_pools]
        values = [s.rows(v, req.sent) for v in req.v_pools]
        packed = pack_tiers(keys, values, lay, tiers[lay.num_kv_heads], s.info.policy)
        head = torch.frombuffer(bytearray(packed.header_bytes), dtype=torch.uint8)
        h, nbytes = head.numel(), packed.nbytes
        _check_fits(s, nbytes)
        s.out[:h].copy_(head)
        s.out[h:nbytes].copy_(packed.payload)
        results.append((s, nbytes, int(packed.header.checksum), tiers[lay.num_kv_heads]))
    sync(req.sent.device)
    t2 = time.perf_counter()
    timings = {"plan": (t1 - t0) * 1e3, "pack": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
    return [
        PackedRequest(
            nbytes=nbytes,
            checksum=checksum,
            num_tokens=s.info.layout.num_tokens,
            full_nbytes=s.info.full_nbytes,
            tier_counts=count_tiers(tier_map),
            path="torch",
            timings_ms=dict(timings),
            heads=s.heads,
            tier_map=tier_map.to(req.sent.device),
            slots=req.sent,
            pool_slots=int(req.k_pools[0].shape[0]),
        )
        for s, nbytes, checksum, tier_map in results
    ]


def _check_fits(s: _Slice, nbytes: int) -> None:
    """Refuse a buffer of ``nbytes`` that ``s.out`` cannot hold (only a given tier map can
    exceed the bound: one allocated for another head count or budget)."""
    if nbytes > s.out.numel():
        raise SpectrumConfigError(
            f"out holds {s.out.numel()} bytes, the request packed with the given tier map"
            f" needs {nbytes} (a map allocated for another head count or budget?)"
        )


def _device_tiers(kern, req: _Request, info: _Layout) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Tier map on the pools' device and its counts ``(fp16, int8, int4)`` for ``info``'s
    head count: the equal-cost waterfall over the fused key-norm ranks (host integers fix
    the counts first), or the reference allocator's map (``optimal``, ``pdtrim``)."""
    cfg, lay, device = req.cfg, info.layout, req.sent.device
    reference = cfg.method == "pdtrim" or (cfg.method == "spectrum" and cfg.allocator != "paper")
    if req.chosen is not None:  # counts known on the host: no readback
        return req.given, req.chosen.counts
    if req.given is not None or reference:  # (given: a host sync for the counts, per part)
        tiers = req.given if req.given is not None else _reference_tiers(req, info)
        counts = tuple(torch.bincount(tiers.long(), minlength=4).tolist()[:3])
        return tiers.to(device), counts
    t = lay.num_tokens
    forced = min(cfg.sinks, t) if cfg.method in ("spectrum", "snapkv") else 0
    buckets = waterfall_counts(t, info.costs, _budget(info, cfg), cfg, forced, fp8_source=lay.fp8)
    n = dict.fromkeys(Tier, 0)
    for tier, c in buckets:
        n[tier] += c
    n[Tier.FP16] += forced
    if req.scores is None:  # over every head of the pools, once
        fp8 = FP8Pool.from_scales(lay.dtype, lay.kv_scales) if lay.fp8 else None
        scores = kern.key_norm_scores_all_layers(req.k_pools, req.all_slots, fp8)
        # sinks of the whole prompt: cfg.sinks of them are sent, the others are context
        req.scores = lift_sinks_and_recent(scores, cfg.sinks + req.context, cfg.window)
        req.scores = req.scores[req.context :]
    return tiers_from_ranks(req.scores, forced, buckets), (n[Tier.FP16], n[Tier.INT8], n[Tier.INT4])


def _pack_kernels(kern, req: _Request, slices: list[_Slice], t0: float) -> list[PackedRequest]:
    """Kernel path. Host-side integers fix every size first (tier counts, offsets, header
    length); the device scores (fused key norms straight from the pools), ranks, plans,
    packs each slice into its ``out`` and checksums; one synchronisation brings the tier
    maps and the checksums back for the headers, which a last small copy per slice writes
    in front of its payload."""
    device = req.sent.device
    maps = {}  # per head count: tier map, counts, plan (the slices of a count share them)
    for s in slices:
        n = s.info.layout.num_kv_heads
        if n not in maps:
            tiers, counts = _device_tiers(kern, req, s.info)
            plan = req.chosen.plan_for(s.info.layout) if req.chosen is not None else None
            if plan is None:
                plan = kern.plan_from_counts(s.info.layout, tiers, counts, req.sent)
                if req.chosen is not None:
                    req.chosen.plans.append(plan)
            maps[n] = (tiers, counts, plan)
    t1 = time.perf_counter()
    headers, starts, payloads, parts = [], [], [], []
    for s in slices:
        lay = s.info.layout
        plan = maps[lay.num_kv_heads][2]
        header = PackedHeader(
            layout=lay,
            tier_map=bytes(lay.num_tokens),  # placeholder of the same encoded length
            offsets=plan.offsets,
            payload_nbytes=plan.payload_nbytes,
            checksum=(1 << 63) - 1,  # the longest encoding: the real one is never longer
            policy=s.info.policy,
        )
        start = header_nbytes(header)
        _check_fits(s, start + plan.payload_nbytes)  # before any write
        region = s.out[start : start + plan.payload_nbytes]
        payload = kern.pack_payload(req.k_pools, req.v_pools, plan, region, s.heads)
        headers.append(header)
        starts.append(start)
        payloads.append(payload)
        parts.append(kern.checksum_parts(payload))
    host_tiers: dict[int, Any] = {}
    for n, (tiers, _, _) in maps.items():
        if req.chosen is not None and req.chosen.host_map is not None:
            host_tiers[n] = req.chosen.host_map  # read back by an earlier group
            continue
        host_tiers[n] = torch.empty(
            tiers.numel(), dtype=torch.uint8, pin_memory=device.type == "cuda"
        )
        host_tiers[n].copy_(tiers, non_blocking=True)
    t_launched = time.perf_counter()
    flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()  # the one sync
    t_synced = time.perf_counter()
    sums, at = [], 0
    for p in parts:  # each slice's pairs
        sums.append(flat[at : at + p.numel()])
        at += p.numel()
    t2 = time.perf_counter()
    host_tiers = {
        n: m if isinstance(m, bytes) else m.numpy().tobytes() for n, m in host_tiers.items()
    }
    if req.chosen is not None and req.chosen.host_map is None:
        req.chosen.host_map = next(iter(host_tiers.values()))
    sizes = []
    for s, header, start, payload, pair in zip(slices, headers, starts, payloads, sums):
        header.checksum = kern.combine_checksum(pair)
        header.tier_map = host_tiers[header.layout.num_kv_heads]
        head = torch.frombuffer(bytearray(encode_header(header)), dtype=torch.uint8)
        if head.numel() != start:  # a short checksum: the payload moves (practically never)
            payload = payload.clone()
            s.out[head.numel() : head.numel() + payload.numel()].copy_(payload)
        s.out[: head.numel()].copy_(head)  # pageable host memory: returns when it is in out
        sizes.append(head.numel() + header.payload_nbytes)
    t_headers = time.perf_counter()
    sync(device)
    t3 = time.perf_counter()
    wait = (t_synced - t_launched) + (t3 - t_headers)  # blocked on the device
    timings = {
        "plan": (t1 - t0) * 1e3,
        "pack": (t2 - t1) * 1e3,
        "header": (t3 - t2) * 1e3,
        "total": (t3 - t0) * 1e3,
        "wait": wait * 1e3,
        "host": (t3 - t0 - wait) * 1e3,
    }
    results = []
    for s, header, nbytes in zip(slices, headers, sizes):
        t, counts = header.layout.num_tokens, maps[header.layout.num_kv_heads][1]
        results.append(
            PackedRequest(
                nbytes=nbytes,
                checksum=int(header.checksum),
                num_tokens=t,
                full_nbytes=s.info.full_nbytes,
                tier_counts=dict(zip(TIER_NAMES, (*counts, t - sum(counts)))),
                path="kernels",
                timings_ms=dict(timings),
                heads=s.heads,
                tier_map=maps[header.layout.num_kv_heads][0],
                slots=req.sent,
                pool_slots=int(req.k_pools[0].shape[0]),
            )
        )
    return results
