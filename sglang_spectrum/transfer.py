"""The request path: pack one request straight from the KV pools into a send region,
validate and unpack a received buffer into the pools (SGLang-free).

The SGLang backend, the benchmark (``bench/request_path.py``) and the GPU tests
call exactly these two functions::

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

Streams and threads: everything runs on the caller's current CUDA stream
(``with torch.cuda.stream(s): pack_request(...)`` packs on ``s``); the
functions return once the bytes are in ``out`` / the pools (the stream is
synchronised). Module-level caches (layouts, plan tables) are guarded by a lock,
so pack and unpack may run on other threads than the scheduler's.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import torch

from .codec import (
    FORMAT_VERSION,
    HEADER_ALIGN,
    MAGIC,
    PACKED_TIERS,
    PREFIX,
    KVLayout,
    PackedHeader,
    UnpackInfo,
    _align,
    _check_extent,
    _decode_header,
    _read_prefix,
    count_tiers,
    iter_decoded_layers,
    measure_tier_errors,
    pack_tiers,
    segment_offsets,
    token_budget,
)
from .config import SpectrumConfig, SpectrumConfigError, SpectrumFormatError
from .fp8 import FP8Pool, check_fp8_pools, dequantize_fp8, pool_bytes, store_rows
from .policy import (
    TIER_NAMES,
    Tier,
    allocate_tiers,
    tiers_from_ranks,
    waterfall_counts,
)
from .scoring import lift_sinks_and_recent, score_tokens
from .sizes import (
    _LOCK,
    _LRU,
    PART_ALIGN,
    _budget,
    _dtype_name,
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
    "packed_size_bound",
    "part_offset",
    "pool_pair_problem",
    "unpack_request",
]

# Tests only: run the kernel path on CPU tensors (Triton's interpreter, TRITON_INTERPRET=1).
_KERNELS_ON_CPU = False


@dataclass(frozen=True)
class PackedRequest:
    """What :func:`pack_request` wrote.

    Attributes:
        nbytes: bytes written at ``out[:nbytes]`` (prefix + header + padding + payload).
        checksum: payload checksum (``codec.payload_checksum`` value), as in the header.
        num_tokens: tokens packed (``len(slots)``).
        full_nbytes: 16-bit bytes of those tokens (the budget's denominator).
        tier_counts: tokens per tier name (``fp16``, ``int8``, ``int4``, ``drop``; ``fp16``
            is the top tier: the FP8 bytes for FP8 pools).
        path: ``"kernels"`` or ``"torch"``: which implementation packed.
        timings_ms: host wall clock of the steps (``plan``, ``pack``, ``total``, ...).
    """

    nbytes: int
    checksum: int
    num_tokens: int
    full_nbytes: int
    tier_counts: dict[str, int]
    path: str
    timings_ms: dict[str, float]


# --------------------------------------------------------------------------- input checks


_POOLS_OK: dict[tuple, bool] = {}


def _check_pools(
    k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor], error, fp8=None
) -> torch.Tensor:
    """Validate the pools (``fp8``: FP8 pools, see :mod:`.fp8`); returns layer 0's K pool."""
    if not isinstance(k_pools, (list, tuple)) or not isinstance(v_pools, (list, tuple)):
        raise error("k_pools and v_pools must be lists of per-layer tensors")
    if not k_pools or len(k_pools) != len(v_pools):
        raise error(f"got {len(k_pools)} K and {len(v_pools)} V pools (need the same, >= 1)")
    ref = k_pools[0]
    if ref.dim() != 3:
        raise error(f"pools must be [num_slots, kv_heads, head_dim], got {tuple(ref.shape)}")
    check_fp8_pools([ref], fp8, len(k_pools), error)
    # SGLang's pools live long: checked once per set of tensor objects and addresses
    key = (ref.shape, ref.dtype, ref.device, *((id(x), x.data_ptr()) for x in k_pools))
    key += tuple((id(x), x.data_ptr()) for x in v_pools)
    if key in _POOLS_OK:
        return ref
    for layer, (k, v) in enumerate(zip(k_pools, v_pools)):
        for x in (k, v):
            if x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
                raise error(f"layer {layer}: pools must share shape, dtype and device")
            if not x.is_contiguous():
                raise error(f"layer {layer}: pools must be contiguous")
    if fp8 is None:
        _dtype_name(ref.dtype, error)
    with _LOCK:
        if len(_POOLS_OK) >= 64:
            _POOLS_OK.clear()
        _POOLS_OK[key] = True
    return ref


def _as_slots(slots, name: str, size: int, device: torch.device, error) -> torch.Tensor:
    """int64 ``[n]`` slots on ``device``, range-checked against pools of ``size`` slots."""
    s = torch.as_tensor(slots)
    if s.dim() != 1 or s.dtype.is_floating_point or s.dtype == torch.bool:
        raise error(f"{name} must be an integer vector, got shape {tuple(s.shape)} {s.dtype}")
    if s.numel():
        lo, hi = torch.stack(torch.aminmax(s)).tolist()  # one readback
        if lo < 0 or hi >= size:
            raise error(f"{name} out of range for pools of {size} slots ([{lo}, {hi}])")
    return s.to(device=device, dtype=torch.int64, non_blocking=True)


def _kernels():
    """``sglang_spectrum.kernels`` or None when Triton is unavailable."""
    try:
        from . import kernels  # installed mapping of the repo's kernels/
    except ImportError:
        return None
    return kernels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


# --------------------------------------------------------------------------- pack


def _sent_config(config: SpectrumConfig, context: int) -> SpectrumConfig:
    """The allocation config of the sent tokens: sinks are the first ``config.sinks``
    positions of the whole prompt, so ``context`` earlier positions take them."""
    sinks = max(0, config.sinks - context)
    return config if sinks == config.sinks else config.with_(sinks=sinks)


def _torch_scores(
    k_pools: Sequence[torch.Tensor],
    all_slots: torch.Tensor,
    config: SpectrumConfig,
    context: int,
    lay: KVLayout,
) -> torch.Tensor:
    """float32 ``[T]`` reference scores of the sent positions (whole prompt scored; FP8
    keys by their real values)."""
    keys = [k[all_slots] for k in k_pools]
    if lay.fp8:
        keys = [dequantize_fp8(k, lay.wire_dtype, lay.scale(i, True)) for i, k in enumerate(keys)]
    scores = score_tokens(keys, sinks=config.sinks, window=config.window)
    return scores[context:]


def pack_request(
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    slots: torch.Tensor,
    config: SpectrumConfig,
    *,
    out: torch.Tensor,
    context_slots: torch.Tensor | None = None,
    fp8: FP8Pool | None = None,
) -> PackedRequest:
    """Score, allocate and pack one request from the pools straight into ``out``.

    Args:
        k_pools, v_pools: per layer ``[num_slots, kv_heads, head_dim]`` (SGLang's MHA
            pool), contiguous, bf16/fp16/fp32, or FP8 (uint8 as SGLang stores it, or
            float8) with ``fp8``; CPU or CUDA.
        slots: int ``[T]``: pool slots of the positions to send, in position order.
        config: budget, tiers, allocator, codec options.
        out: uint8 ``[>= packed_size_bound(...)]`` on the pools' device (the send region);
            the whole buffer is written to ``out[:nbytes]``.
        context_slots: int ``[P]``: slots of the ``P`` positions before ``slots`` that the
            receiver already holds: scored with the sent ones (sinks are the first
            ``config.sinks`` positions of the whole prompt) but not packed.
        fp8: FP8 pools: ``FP8Pool.of(pool.dtype, L, k_scales, v_scales)`` (SGLang: the
            pool's float8 ``dtype``, per layer ``k_scale_float`` / ``v_scale_float`` or
            None). Tiers: the FP8 bytes (top tier, lossless), INT4 of the scaled values
            (tier mode ``"3"``); the scales travel in the header. The budget stays
            relative to the 16-bit KV: 0.5 and above send every token in FP8.

    Returns:
        :class:`PackedRequest`. Runs on the current CUDA stream and returns once the
        bytes are in ``out``. Never drops tokens when ``config.allow_drop`` is False.

    Raises:
        SpectrumConfigError: bad pools, slots, ``out`` or a budget that cannot hold the sinks.
    """
    t0 = time.perf_counter()
    if not isinstance(config, SpectrumConfig):
        raise SpectrumConfigError(f"config must be a SpectrumConfig, got {type(config)}")
    ref = _check_pools(k_pools, v_pools, SpectrumConfigError, fp8)
    device, num_slots = ref.device, int(ref.shape[0])
    if fp8 is None:
        dtype, scales = _dtype_name(ref.dtype), None
    else:  # the kernels and the reference read the FP8 bits as uint8
        k_pools, v_pools = pool_bytes(k_pools), pool_bytes(v_pools)
        dtype, scales = fp8.name, tuple(fp8.scales)
    sent = _as_slots(slots, "slots", num_slots, device, SpectrumConfigError)
    if sent.numel() < 1:
        raise SpectrumConfigError("cannot pack a request of 0 tokens")
    context = 0
    if context_slots is not None:
        ctx = _as_slots(context_slots, "context_slots", num_slots, device, SpectrumConfigError)
        context = int(ctx.numel())
        all_slots = torch.cat([ctx, sent]) if context else sent
    else:
        all_slots = sent
    if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.device != device:
        raise SpectrumConfigError(f"out must be a uint8 tensor on {device}")
    if not out.is_contiguous():
        raise SpectrumConfigError("out must be contiguous")
    out = out.reshape(-1)
    num_layers, heads, head_dim = len(k_pools), int(ref.shape[1]), int(ref.shape[2])
    bound = packed_size_bound(sent.numel(), num_layers, heads, head_dim, dtype, config)
    if out.numel() < bound:
        raise SpectrumConfigError(
            f"out holds {out.numel()} bytes, a request of {sent.numel()} tokens needs up to"
            f" {bound} (packed_size_bound)"
        )
    cfg = _sent_config(config, context)
    info = _layout_info(int(sent.numel()), num_layers, heads, head_dim, dtype, config, scales)
    kern = _kernels() if device.type == "cuda" or _KERNELS_ON_CPU else None
    if kern is not None and kern.kernel_supported(info.layout):
        with _on_device(device):  # Triton launches on the current device: the pools'
            return _pack_kernels(
                kern, k_pools, v_pools, sent, all_slots, cfg, info, out, context, t0
            )
    return _pack_torch(k_pools, v_pools, sent, all_slots, cfg, info, out, context, t0)


def _pack_torch(k_pools, v_pools, sent, all_slots, cfg, info, out, context, t0) -> PackedRequest:
    """The reference: gather, score, ``allocate_tiers``, ``pack_tiers``, copy into out."""
    lay = info.layout
    keys = [k[sent] for k in k_pools]
    values = [v[sent] for v in v_pools]
    scores = _torch_scores(k_pools, all_slots, cfg, context, lay)
    errors = None
    if cfg.method == "spectrum" and cfg.allocator == "optimal":
        errors = measure_tier_errors(keys, values, lay)
    budget = token_budget(lay, cfg)
    tiers = allocate_tiers(scores, lay.token_costs(), budget, cfg, errors, lay.fp8)
    t1 = time.perf_counter()
    packed = pack_tiers(keys, values, lay, tiers, info.policy)
    head = torch.frombuffer(bytearray(packed.header_bytes), dtype=torch.uint8)
    h, nbytes = head.numel(), packed.nbytes
    out[:h].copy_(head)
    out[h:nbytes].copy_(packed.payload)
    _sync(out.device)
    t2 = time.perf_counter()
    return PackedRequest(
        nbytes=nbytes,
        checksum=int(packed.header.checksum),
        num_tokens=lay.num_tokens,
        full_nbytes=info.full_nbytes,
        tier_counts=count_tiers(tiers),
        path="torch",
        timings_ms={
            "plan": (t1 - t0) * 1e3,
            "pack": (t2 - t1) * 1e3,
            "total": (t2 - t0) * 1e3,
        },
    )


def _pack_kernels(
    kern, k_pools, v_pools, sent, all_slots, cfg, info, out, context, t0
) -> PackedRequest:
    """Kernel path. Host-side integers fix every size first (tier counts of the
    equal-cost waterfall, offsets, header length); the device scores (fused key
    norms straight from the pools), ranks, plans, packs into ``out`` and checksums;
    one synchronisation brings the tier map and the checksum back for the header,
    which a last small copy writes in front of the payload."""
    lay = info.layout
    device = out.device
    num_tokens = lay.num_tokens
    if cfg.method == "pdtrim" or (cfg.method == "spectrum" and cfg.allocator != "paper"):
        tiers = _reference_tiers(k_pools, v_pools, sent, all_slots, cfg, info, context)
        counts = tuple(torch.bincount(tiers.long(), minlength=4).tolist()[:3])
        tiers = tiers.to(device)
    else:
        forced = min(cfg.sinks, num_tokens) if cfg.method in ("spectrum", "snapkv") else 0
        buckets = waterfall_counts(
            num_tokens, info.costs, _budget(info, cfg), cfg, forced, fp8_source=lay.fp8
        )
        n = dict.fromkeys(Tier, 0)
        for tier, c in buckets:
            n[tier] += c
        n[Tier.FP16] += forced
        counts = (n[Tier.FP16], n[Tier.INT8], n[Tier.INT4])
        fp8 = FP8Pool.from_scales(lay.dtype, lay.kv_scales) if lay.fp8 else None
        scores = kern.key_norm_scores_all_layers(k_pools, all_slots, fp8)
        # sinks of the whole prompt: cfg.sinks of them are sent, the others are context
        scores = lift_sinks_and_recent(scores, cfg.sinks + context, cfg.window)[context:]
        tiers = tiers_from_ranks(scores, forced, buckets)
    plan = kern.plan_from_counts(lay, tiers, counts, sent)
    tier_map = bytes(num_tokens)  # placeholder of the same encoded length
    header = PackedHeader(
        layout=lay,
        tier_map=tier_map,
        offsets=plan.offsets,
        payload_nbytes=plan.payload_nbytes,
        checksum=(1 << 63) - 1,  # the longest encoding: the real one is never longer
        policy=info.policy,
    )
    start = _payload_start(header)
    t1 = time.perf_counter()
    payload = kern.pack_payload(k_pools, v_pools, plan, out=out[start:])
    parts = kern.checksum_parts(payload)
    host_tiers = torch.empty(num_tokens, dtype=torch.uint8, pin_memory=device.type == "cuda")
    host_tiers.copy_(tiers, non_blocking=True)
    header.checksum = kern.combine_checksum(parts.tolist())  # the one synchronisation
    t2 = time.perf_counter()
    header.tier_map = host_tiers.numpy().tobytes()
    head = _header_bytes(header)
    if head.numel() != start:  # a short checksum: the payload moves (practically never)
        payload = payload.clone()
        out[head.numel() : head.numel() + payload.numel()].copy_(payload)
    out[: head.numel()].copy_(head)  # pageable host memory: returns when it is in out
    _sync(device)
    t3 = time.perf_counter()
    return PackedRequest(
        nbytes=head.numel() + plan.payload_nbytes,
        checksum=int(header.checksum),
        num_tokens=num_tokens,
        full_nbytes=info.full_nbytes,
        tier_counts=dict(zip(TIER_NAMES, (*counts, num_tokens - sum(counts)))),
        path="kernels",
        timings_ms={
            "plan": (t1 - t0) * 1e3,
            "pack": (t2 - t1) * 1e3,
            "header": (t3 - t2) * 1e3,
            "total": (t3 - t0) * 1e3,
        },
    )


def _reference_tiers(k_pools, v_pools, sent, all_slots, cfg, info, context) -> torch.Tensor:
    """uint8 ``[T]`` CPU tier map of the reference allocator (``optimal``, ``pdtrim``)."""
    lay = info.layout
    scores = _torch_scores(k_pools, all_slots, cfg, context, lay)
    errors = None
    if cfg.method == "spectrum" and cfg.allocator == "optimal":
        keys = [k[sent] for k in k_pools]
        values = [v[sent] for v in v_pools]
        errors = measure_tier_errors(keys, values, lay)
    return allocate_tiers(scores, lay.token_costs(), _budget(info, cfg), cfg, errors, lay.fp8)


def _header_bytes(header: PackedHeader) -> torch.Tensor:
    """uint8 CPU tensor: prefix + msgpack header + zero padding (``codec.encode_header``)."""
    body = msgspec.msgpack.encode(header)
    raw = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(body), zlib.crc32(body)) + body
    buf = bytearray(_align(len(raw), HEADER_ALIGN))
    buf[: len(raw)] = raw
    return torch.frombuffer(buf, dtype=torch.uint8)


def _payload_start(header: PackedHeader) -> int:
    return _align(PREFIX.size + len(msgspec.msgpack.encode(header)), HEADER_ALIGN)


# --------------------------------------------------------------------------- unpack


def _parse(buf: torch.Tensor, num_layers: int, num_tokens: int) -> tuple[PackedHeader, int, list]:
    """Validate prefix, header CRC, header, tier map and offsets; (header, payload start,
    tokens per tier ``[fp16, int8, int4, drop]``).

    One device-to-host copy of the buffer's head (sized for ``num_tokens`` tokens),
    a second one only if the header is longer than that.
    """
    head, header_len, header_crc, start = _read_prefix(
        buf, PREFIX.size + num_tokens + 64 * num_layers * 9 + 1024
    )
    if PREFIX.size + header_len > len(head):
        head = buf[: PREFIX.size + header_len].cpu().numpy().tobytes()
    header = _decode_header(head[PREFIX.size : PREFIX.size + header_len], header_crc)
    offsets, payload_nbytes, counts = _offsets_of(header.layout, header.tier_map)
    _check_extent(header, offsets, payload_nbytes, buf.numel(), start)
    return header, start, counts


def _offsets_of(lay: KVLayout, tier_map: bytes) -> tuple[list[int], int, list]:
    """``codec.segment_offsets`` (fast when every layer holds every position) and the
    tokens per tier."""
    tiers = torch.frombuffer(bytearray(tier_map), dtype=torch.uint8)
    counts = torch.bincount(tiers.long(), minlength=4).tolist()
    if any(lay.layer_first_pos):
        return (*segment_offsets(lay, tiers), counts)
    return (*_uniform_offsets(lay, tuple(counts[:3])), counts)


_OFFSETS = _LRU()


def _uniform_offsets(lay: KVLayout, counts: tuple[int, int, int]) -> tuple[list[int], int]:
    """Segment offsets and payload size when every layer holds every position (cached
    per layout and counts; callers get their own list)."""
    key = (msgspec.msgpack.encode(lay), counts)
    offsets, pos = _OFFSETS.get_or(key, lambda: _make_uniform_offsets(lay, counts))
    return list(offsets), pos


def _make_uniform_offsets(lay: KVLayout, counts: tuple[int, int, int]) -> tuple[tuple, int]:
    offsets, pos = [], 0
    for tier, n in zip(PACKED_TIERS, counts):
        k_size, v_size = lay.seg_nbytes(tier, n, True), lay.seg_nbytes(tier, n, False)
        for _ in range(lay.num_layers):
            for size in (k_size, v_size):
                pos = _align(pos, 16)
                offsets.append(pos)
                pos += size
    return tuple(offsets), pos


def unpack_request(
    buffer: torch.Tensor,
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    slots: torch.Tensor,
    *,
    expected_checksum: int | None = None,
    fp8: FP8Pool | None = None,
) -> UnpackInfo:
    """Validate a received buffer once, then write its dequantised KV into the pools.

    Args:
        buffer: uint8 ``[>= nbytes]`` (the receive region, any device; trailing bytes
            are ignored).
        k_pools, v_pools: per layer ``[num_slots, kv_heads, head_dim]``, contiguous:
            bf16/fp16/fp32, or FP8 (uint8 as SGLang stores it, or float8) with ``fp8``.
        slots: int ``[T]``: destination pool slot of each packed position.
        expected_checksum: the checksum the sender announced; must equal the header's.
        fp8: FP8 pools: ``FP8Pool.of(pool.dtype, L, k_scales, v_scales)`` with the
            *decode's* scales; every value is stored as ``(x / scale)`` saturated to
            FP8 (:func:`.fp8.quantize_fp8`), the sender's FP8 bytes unchanged when its
            dtype and scales are the same. Any source dtype unpacks into any pools.

    Returns:
        :class:`codec.UnpackInfo` (``layout.dtype`` names the sender's pool dtype).

    Raises:
        SpectrumFormatError: malformed, truncated or corrupted buffer, a layout that does
            not match the pools, wrong slots, another checksum. Nothing is written then.
    """
    pools = k_pools if isinstance(k_pools, (list, tuple)) and k_pools else [torch.empty(0)]
    device = pools[0].device if isinstance(pools[0], torch.Tensor) else torch.device("cpu")
    with _on_device(device):  # Triton launches (checksum, unpack) on the pools' device
        return _unpack_request(buffer, k_pools, v_pools, slots, expected_checksum, fp8)


def _unpack_request(buffer, k_pools, v_pools, slots, expected_checksum, fp8) -> UnpackInfo:
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8:
        raise SpectrumFormatError("buffer must be a uint8 tensor")
    buf = buffer.reshape(-1)
    ref = _check_pools(k_pools, v_pools, SpectrumFormatError, fp8)
    if fp8 is not None:
        k_pools, v_pools = pool_bytes(k_pools), pool_bytes(v_pools)
    device, num_slots = ref.device, int(ref.shape[0])
    s = torch.as_tensor(slots)
    header, start, counts = _parse(buf, len(k_pools), max(int(s.numel()), 1))
    lay = header.layout
    want = (lay.num_layers, lay.num_kv_heads, lay.head_dim)
    got = (len(k_pools), int(ref.shape[1]), int(ref.shape[2]))
    if want != got:
        raise SpectrumFormatError(
            f"buffer holds {want[0]} layers x {want[1]} KV heads x {want[2]}, pools are"
            f" {got[0]} x {got[1]} x {got[2]}"
        )
    if s.dim() != 1 or s.numel() != lay.num_tokens:
        raise SpectrumFormatError(
            f"slots must be a vector of {lay.num_tokens} entries, got shape {tuple(s.shape)}"
        )
    if expected_checksum is not None and int(expected_checksum) != int(header.checksum):
        raise SpectrumFormatError(
            "payload checksum differs from the one the sender announced (stale or foreign"
            " data in the receive buffer)"
        )
    kern = _kernels() if device.type == "cuda" or _KERNELS_ON_CPU else None
    payload = buf[start : start + header.payload_nbytes]
    if payload.device != device:
        payload = payload.to(device)
    if s.dtype.is_floating_point or s.dtype == torch.bool:
        raise SpectrumFormatError(f"slots must be an integer vector, got {s.dtype}")
    if kern is None:
        dst = _as_slots(s, "slots", num_slots, device, SpectrumFormatError)
        if _ref_checksum(payload) != header.checksum:
            raise SpectrumFormatError("payload checksum mismatch: the KV data is corrupted")
    tier_bytes = bytearray(header.tier_map)
    tiers = torch.frombuffer(tier_bytes, dtype=torch.uint8)
    plan = None
    if kern is not None:  # checksum on the device; slot range and checksum come back in one copy
        dst = s.to(device=device, dtype=torch.int64, non_blocking=True)
        checks = [kern.checksum_parts(payload)]
        if dst.numel():
            checks.append(torch.stack(torch.aminmax(dst)))
        # the plan reads only the slots and the tier map (never the pools): its launches
        # overlap the checksum pass; the unpack itself waits for the validation below
        plan = _unpack_plan(kern, lay, tiers, counts, dst, device, fp8)
        got = torch.cat(checks).tolist()
        if kern.combine_checksum(got[:2]) != header.checksum:
            raise SpectrumFormatError("payload checksum mismatch: the KV data is corrupted")
        if len(got) > 2 and (got[2] < 0 or got[3] >= num_slots):
            raise SpectrumFormatError(
                f"slots out of range for pools of {num_slots} slots ([{got[2]}, {got[3]}])"
            )
    _write(kern, plan, header, payload, dst, k_pools, v_pools, fp8, device)
    return UnpackInfo(
        num_tokens=lay.num_tokens,
        dropped=torch.nonzero(tiers == int(Tier.DROP)).flatten(),
        tier_counts=dict(zip(TIER_NAMES, counts)),
        layout=lay,
    )


def _on_device(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA (Triton launches on the current device, so a
    worker thread of another device still packs on the pools' one), else a no-op."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _unpack_plan(kern, lay, tiers, counts, dst, device, fp8):
    """The unpack kernels' plan (None: the torch reference writes)."""
    if not kern.kernel_supported(lay, fp8_pools=fp8 is not None):
        return None
    if any(lay.layer_first_pos):
        return kern.plan_transfer(lay, tiers, dst)
    dev_tiers = tiers.pin_memory() if device.type == "cuda" else tiers
    return kern.plan_from_counts(
        lay, dev_tiers.to(device, non_blocking=True), tuple(counts[:3]), dst
    )


def _write(kern, plan, header, payload, dst, k_pools, v_pools, fp8, device) -> None:
    """Write a validated payload into the pools (kernels, or the torch reference)."""
    if plan is not None:
        kern.unpack_payload(payload, k_pools, v_pools, plan, fp8=fp8)
    else:
        for layer, positions, k, v in iter_decoded_layers(header, payload):
            rows = dst[positions.to(device)]
            store_rows(k_pools[layer], rows, k, fp8, layer, key=True)
            store_rows(v_pools[layer], rows, v, fp8, layer, key=False)
    _sync(device)


def _ref_checksum(payload: torch.Tensor) -> int:
    from .codec import payload_checksum

    return payload_checksum(payload)
