"""The decode side of the request path (:mod:`.transfer`): validate a received buffer once,
then write its KV into the pools (all their heads, or a head range under heterogeneous TP,
see :mod:`.heads`). SGLang-free; :func:`unpack_request` is re-exported by :mod:`.transfer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import torch

from .codec import (
    PACKED_TIERS,
    PREFIX,
    KVLayout,
    PackedHeader,
    UnpackInfo,
    _align,
    _check_extent,
    _decode_header,
    _read_prefix,
    iter_decoded_layers,
    segment_offsets,
)
from .config import SpectrumFormatError
from .fp8 import FP8Pool, pool_bytes, store_rows
from .policy import TIER_NAMES, Tier
from .pools import as_slots, check_heads, check_pools, kernels_for, num_heads, on_device, sync
from .sizes import _LRU


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
    heads: tuple[int, int] | None = None,
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
            A buffer from FP8 pools with top-tier rows, unpacked into pools of another
            dtype or other scales (:func:`converts_fp8_source`), runs the kernels only
            on devices in :data:`FP8_CONVERSION_KERNEL_DEVICES` (else the torch
            reference). Every other case (the same-format byte copy included) runs the
            kernels.
        heads: write heads ``[g0, g1)`` of the pools (heterogeneous TP: the ``dst`` of a
            :class:`.heads.HeadSlice`), the others untouched; the buffer must hold
            ``g1 - g0`` heads. None: the buffer holds every head of the pools.

    Returns:
        :class:`codec.UnpackInfo` (``layout.dtype`` names the sender's pool dtype).

    Raises:
        SpectrumFormatError: malformed, truncated or corrupted buffer, a layout that does
            not match the pools (or the head range), a head range out of bounds, wrong
            slots, another checksum. Nothing is written then.
    """
    pools = k_pools if isinstance(k_pools, (list, tuple)) and k_pools else [torch.empty(0)]
    device = pools[0].device if isinstance(pools[0], torch.Tensor) else torch.device("cpu")
    with on_device(device):  # Triton launches (checksum, unpack) on the pools' device
        return _unpack_request(buffer, k_pools, v_pools, slots, expected_checksum, fp8, heads)


def _unpack_request(buffer, k_pools, v_pools, slots, expected_checksum, fp8, heads):
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8:
        raise SpectrumFormatError("buffer must be a uint8 tensor")
    buf = buffer.reshape(-1)
    ref = check_pools(k_pools, v_pools, SpectrumFormatError, fp8)
    heads = check_heads(heads, int(ref.shape[1]), SpectrumFormatError)
    if fp8 is not None:
        k_pools, v_pools = pool_bytes(k_pools), pool_bytes(v_pools)
    device, num_slots = ref.device, int(ref.shape[0])
    s = torch.as_tensor(slots)
    header, start, counts = _parse(buf, len(k_pools), max(int(s.numel()), 1))
    lay = header.layout
    want = (lay.num_layers, lay.num_kv_heads, lay.head_dim)
    got = (len(k_pools), num_heads(heads, int(ref.shape[1])), int(ref.shape[2]))
    if want != got:
        where = "pools are" if heads is None else f"head range [{heads[0]}, {heads[1]}) of pools is"
        raise SpectrumFormatError(
            f"buffer holds {want[0]} layers x {want[1]} KV heads x {want[2]}, {where}"
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
    kern = kernels_for(device)
    payload = buf[start : start + header.payload_nbytes]
    if payload.device != device:
        payload = payload.to(device)
    if s.dtype.is_floating_point or s.dtype == torch.bool:
        raise SpectrumFormatError(f"slots must be an integer vector, got {s.dtype}")
    if kern is None:
        dst = as_slots(s, "slots", num_slots, device, SpectrumFormatError)
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
        got, n = torch.cat(checks).tolist(), checks[0].numel()
        if kern.combine_checksum(got[:n]) != header.checksum:
            raise SpectrumFormatError("payload checksum mismatch: the KV data is corrupted")
        if len(got) > n and (got[n] < 0 or got[n + 1] >= num_slots):
            raise SpectrumFormatError(
                f"slots out of range for pools of {num_slots} slots ([{got[n]}, {got[n + 1]}])"
            )
    _write(kern, plan, header, payload, dst, (k_pools, v_pools), fp8, device, heads)
    return UnpackInfo(
        num_tokens=lay.num_tokens,
        dropped=torch.nonzero(tiers == int(Tier.DROP)).flatten(),
        tier_counts=dict(zip(TIER_NAMES, counts)),
        layout=lay,
    )


# Device types whose unpack kernel may convert an FP8 source's top tier (see
# :func:`converts_fp8_source`); on any other the torch reference writes those rows
# (``iter_decoded_layers`` + ``store_rows``). CUDA was left out after the H200 (Triton 3.6,
# 2026-12-03) unpacked -0.0 (byte 0x80) as +0.0 (``-x`` compiled as ``0.0 - x``);
# ``kernels/_fp8.from_fp8`` no longer negates a float, and the second H200 run that day
# passed tests/test_fp8_kernels.py::test_gpu_unpack_across_pool_formats and
# tests/test_fp8_transfer.py::test_gpu_fp8_conversion_kernel_equals_reference
# (bench/results/gpu_calls/2026-12-03-s2/gpu_pytest.log).
FP8_CONVERSION_KERNEL_DEVICES: frozenset[str] = frozenset({"cpu", "cuda"})


def converts_fp8_source(lay: KVLayout, fp8: FP8Pool | None) -> bool:
    """True when unpacking ``lay``'s buffer reads an FP8 source's top tier as real values
    (``fp8 * scale``) to store them another way: into 16/32-bit pools (``fp8`` None), FP8
    pools of the other dtype or of other scales. False for 16/32-bit sources and for the
    byte copy (FP8 pools of the sender's dtype and scales)."""
    if not lay.fp8:
        return False
    return fp8 is None or fp8.name != lay.dtype or list(lay.kv_scales) != fp8.scales


def _unpack_plan(kern, lay, tiers, counts, dst, device, fp8):
    """The unpack kernels' plan (None: the torch reference writes): not for layouts the
    kernels do not support, nor for an FP8 source's top tier converted on a device not in
    :data:`FP8_CONVERSION_KERNEL_DEVICES`."""
    if not kern.kernel_supported(lay, fp8_pools=fp8 is not None):
        return None
    if (
        counts[0]
        and device.type not in FP8_CONVERSION_KERNEL_DEVICES
        and converts_fp8_source(lay, fp8)
    ):
        return None
    if any(lay.layer_first_pos):
        return kern.plan_transfer(lay, tiers, dst)
    dev_tiers = tiers.pin_memory() if device.type == "cuda" else tiers
    return kern.plan_from_counts(
        lay, dev_tiers.to(device, non_blocking=True), tuple(counts[:3]), dst
    )


def _write(kern, plan, header, payload, dst, pools, fp8, device, heads) -> None:
    """Write a validated payload into heads ``heads`` (None: all) of the pools ``(k_pools,
    v_pools)`` (kernels, or the torch reference)."""
    k_pools, v_pools = pools
    if plan is not None:
        kern.unpack_payload(payload, k_pools, v_pools, plan, fp8=fp8, heads=heads)
    else:
        for layer, positions, k, v in iter_decoded_layers(header, payload):
            rows = dst[positions.to(device)]
            store_rows(k_pools[layer], rows, k, fp8, layer, key=True, heads=heads)
            store_rows(v_pools[layer], rows, v, fp8, layer, key=False, heads=heads)
    sync(device)


def _ref_checksum(payload: torch.Tensor) -> int:
    from .codec import payload_checksum

    return payload_checksum(payload)
