"""The packed KV codec (third layer of the data flow): quantise, pack, unpack.

This module is the torch reference of the format: it packs KV tensors under a tier
map, reads buffers back and writes them into pools. The wire format itself (layout,
header, offsets, checksums, validation) is specified in :mod:`.wire`, the quantisers
in :mod:`.quant`; both are re-exported here. The GPU kernels in
``sglang_spectrum.kernels`` write and read the very same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import SpectrumConfig, SpectrumConfigError, SpectrumFormatError
from .fp8 import (
    FP8_DTYPES,
    FP8Pool,
    as_scale,
    check_fp8_pools,
    dequantize_fp8,
    dtype_name,
    store_rows,
)
from .policy import QUANT_BITS, Tier, allocate_tiers, allowed_tiers
from .quant import (  # noqa: F401 (re-exported: the codec's quantisers)
    dequantize,
    dequantize_channels,
    hadamard,
    quantize,
    quantize_channels,
)
from .scoring import infer_layer_first_pos, score_tokens
from .wire import (  # noqa: F401 (re-exported: the wire format)
    _DTYPES,
    FORMAT_VERSION,
    HEADER_ALIGN,
    MAGIC,
    PACKED_TIERS,
    PREFIX,
    SCALE_BYTES,
    SEGMENT_ALIGN,
    SOURCE_DTYPES,
    KVLayout,
    PackedHeader,
    _align,
    _as_uint8,
    _check_extent,
    _decode_header,
    _read_prefix,
    count_tiers,
    encode_header,
    fixed_overhead,
    header_nbytes,
    header_tier_map,
    payload_checksum,
    read_header,
    segment_offsets,
)


def real_rows(x: torch.Tensor, layout: KVLayout, layer: int = 0, key: bool = False) -> torch.Tensor:
    """float32 real values of source rows ``x`` ``[n, H, D]`` of ``layer``: FP8 sources
    (float8 or uint8 bits) dequantised with the layer's scale, others widened."""
    if layout.fp8:
        return dequantize_fp8(x, layout.wire_dtype, layout.scale(layer, key))
    return x.float()


def encode_rows(
    x: torch.Tensor, tier: Tier, layout: KVLayout, key: bool = False, layer: int = 0
) -> torch.Tensor:
    """Encode K (``key``) or V rows ``[n, H, D]`` of ``layer`` at ``tier`` into flat uint8
    segment bytes: codes ``[n, H, D * bits / 8]``, then the scales (see :func:`quantize`,
    :func:`quantize_channels`). FP8 sources: ``x`` holds the FP8 bits (float8 or uint8);
    the top tier copies them, INT8/INT4 quantise the scaled values."""
    if tier == Tier.FP16:
        if layout.fp8:
            return x.contiguous().view(torch.uint8).reshape(-1)
        return x.to(layout.wire_dtype).contiguous().view(torch.uint8).reshape(-1)
    xf = real_rows(x, layout, layer, key)
    if layout.rotation == "hadamard":
        xf = xf @ hadamard(layout.head_dim, x.device)
    if key and layout.key_scaled_per_channel(tier):
        codes, scales = quantize_channels(xf, QUANT_BITS[tier], layout.key_block)
    else:
        codes, scales = quantize(xf, QUANT_BITS[tier], layout.group_size)
    return torch.cat([codes.reshape(-1), scales.contiguous().view(torch.uint8).reshape(-1)])


def decode_rows(
    seg: torch.Tensor, n: int, tier: Tier, layout: KVLayout, key: bool = False, layer: int = 0
) -> torch.Tensor:
    """Decode ``n`` K (``key``) or V rows of ``layer`` from one segment (flat uint8) into
    float32 real values ``[n, H, D]``."""
    h, d = layout.num_kv_heads, layout.head_dim
    if tier == Tier.FP16:
        if layout.fp8:
            return real_rows(seg.reshape(n, h, d), layout, layer, key)
        return seg.view(layout.wire_dtype).reshape(n, h, d).float()
    bits = QUANT_BITS[tier]
    code_bytes = n * h * d * bits // 8
    codes = seg[:code_bytes].reshape(n, h, d * bits // 8)
    if key and layout.key_scaled_per_channel(tier):
        blocks = -(-n // layout.key_block)
        scales = seg[code_bytes:].view(torch.float16).reshape(blocks, h, d, 2)
        out = dequantize_channels(codes, scales, bits, d, layout.key_block)
    else:
        scales = seg[code_bytes:].view(torch.float16).reshape(n, h, layout.groups, 2)
        out = dequantize(codes, scales, bits, d)
    if layout.rotation == "hadamard":
        out = out @ hadamard(d, seg.device)
    return out


def measure_tier_errors(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], layout: KVLayout
) -> torch.Tensor:
    """Squared reconstruction error of every token at every tier, float64 ``[T, 4]``.

    Summed over layers, heads, head_dim, K and V; DROP costs the squared norm. For FP8
    sources the errors are those of the real values (the top tier's is 0).
    """
    err = torch.zeros(layout.num_tokens, 4, dtype=torch.float64)
    for layer, pair in enumerate(zip(keys, values)):
        first = layout.layer_first_pos[layer]
        for kv, x in enumerate(pair):
            xf = real_rows(x, layout, layer, key=kv == 0)
            for tier in Tier:
                if tier == Tier.DROP:
                    approx = torch.zeros_like(xf)
                else:
                    enc = encode_rows(x, tier, layout, key=kv == 0, layer=layer)
                    approx = decode_rows(enc, x.shape[0], tier, layout, kv == 0, layer)
                err[first:, tier] += ((xf - approx) ** 2).sum(dim=(1, 2)).double().cpu()
    return err


@dataclass
class PackedKV:
    """One request's packed KV: header + payload, ready for one bulk transfer.

    ``payload`` stays on the device the KV came from; :meth:`to_bytes` and
    :meth:`to_tensor` give the whole buffer (prefix, header, padding, payload).
    """

    header: PackedHeader
    header_bytes: bytes  # prefix + encoded header + padding
    payload: torch.Tensor  # uint8 [payload_nbytes]

    @property
    def layout(self) -> KVLayout:
        return self.header.layout

    @property
    def nbytes(self) -> int:
        return len(self.header_bytes) + self.payload.numel()

    @property
    def full_nbytes(self) -> int:
        return self.layout.full_nbytes

    @property
    def bytes_ratio(self) -> float:
        return self.nbytes / self.full_nbytes

    @property
    def tiers(self) -> torch.Tensor:
        """uint8 ``[T]`` tier map."""
        return header_tier_map(self.header)

    @property
    def tier_counts(self) -> dict[str, int]:
        return count_tiers(self.tiers)

    def to_bytes(self) -> bytes:
        return self.header_bytes + self.payload.cpu().numpy().tobytes()

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        device = self.payload.device if device is None else device
        head = torch.frombuffer(bytearray(self.header_bytes), dtype=torch.uint8).to(device)
        return torch.cat([head, self.payload.to(device)])


def _check_kv(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple)):
        raise SpectrumConfigError("keys and values must be lists (one tensor per layer)")
    if len(keys) != len(values) or not keys:
        raise SpectrumConfigError(
            f"keys and values must have the same, non-zero number of layers,"
            f" got {len(keys)} and {len(values)}"
        )
    ref = keys[0]
    for layer, (k, v) in enumerate(zip(keys, values)):
        if k.dim() != 3 or k.shape != v.shape:
            raise SpectrumConfigError(
                f"layer {layer}: keys and values must both be [tokens, kv_heads, head_dim],"
                f" got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.shape[1:] != ref.shape[1:] or k.dtype != ref.dtype or v.dtype != ref.dtype:
            raise SpectrumConfigError(
                f"layer {layer}: all layers must share kv_heads, head_dim and dtype"
            )
    if ref.dtype not in SOURCE_DTYPES.values():
        raise SpectrumConfigError(
            f"unsupported KV dtype {ref.dtype} (FP8 KV: float8_e4m3fn / float8_e5m2 tensors)"
        )


def config_layout(
    config: SpectrumConfig,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype | str,
    num_tokens: int,
    layer_first_pos: list[int] | None = None,
    kv_scales: Sequence[float] | None = None,
) -> KVLayout:
    """The :class:`KVLayout` ``config`` packs a KV of this shape with (every layer
    holding all ``num_tokens`` unless ``layer_first_pos`` says otherwise). FP8 dtypes
    take ``kv_scales`` (2L: K of every layer, then V; default 1.0)."""
    name = dtype_name(dtype)
    if name in FP8_DTYPES:
        scales = [1.0] * (2 * num_layers) if kv_scales is None else list(kv_scales)
        scales = [as_scale(s, "kv_scales") for s in scales]
    elif kv_scales:
        raise SpectrumConfigError(f"kv_scales are for FP8 sources, not {name}")
    else:
        scales = []
    return KVLayout(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=name,
        group_size=config.resolved_group_size(head_dim),
        num_tokens=num_tokens,
        layer_first_pos=[0] * num_layers if layer_first_pos is None else layer_first_pos,
        rotation=config.rotation,
        key_block=config.resolved_key_block,
        kv_scales=scales,
    )


def make_layout(
    keys: Sequence[torch.Tensor],
    config: SpectrumConfig,
    num_tokens: int | None = None,
    fp8: FP8Pool | None = None,
) -> KVLayout:
    """The :class:`KVLayout` of per-layer ``[T_l, H, D]`` keys under ``config``; float8
    keys take their scales from ``fp8`` (default 1.0)."""
    _check_kv(keys, keys)
    total, first = infer_layer_first_pos(keys, num_tokens)
    _, heads, head_dim = keys[0].shape
    if head_dim % 2:
        raise SpectrumConfigError(f"head_dim must be even for INT4 packing, got {head_dim}")
    scales = None
    if fp8 is not None:
        if fp8.dtype != keys[0].dtype or fp8.num_layers != len(keys):
            raise SpectrumConfigError(
                f"fp8 describes {fp8.num_layers} layers of {fp8.name}, the KV is"
                f" {len(keys)} layers of {keys[0].dtype}"
            )
        scales = fp8.scales
    layout = config_layout(config, len(keys), heads, head_dim, keys[0].dtype, total, first, scales)
    if config.rotation == "hadamard":
        hadamard(head_dim)  # fails early for non power-of-two head_dim
    if total < 1:
        raise SpectrumConfigError("cannot pack a prompt of 0 tokens")
    return layout


def token_budget(layout: KVLayout, config: SpectrumConfig) -> int:
    """Bytes the allocator may spend on token data (the buffer minus its fixed part).

    ``floor(budget * full_nbytes) - fixed_overhead``; at ``budget >=
    layout.lossless_budget`` (1.0, or 0.5 for FP8 sources) at least everything at the
    top tier (lossless); with ``allow_drop=False`` at least every token at the cheapest
    allowed tier, sinks at the top tier (then a short prompt may exceed the budget
    instead of losing tokens).
    """
    costs = layout.token_costs()
    budget = math.floor(config.budget * layout.full_nbytes) - fixed_overhead(layout)
    if config.budget >= layout.lossless_budget:
        budget = max(budget, int(costs[:, Tier.FP16].sum()))
    if not config.allow_drop:
        sinks = min(config.sinks, layout.num_tokens)
        base = allowed_tiers(config, fp8_source=layout.fp8)[-1]
        budget = max(budget, int(costs[:sinks, Tier.FP16].sum() + costs[sinks:, base].sum()))
    return budget


def plan_tiers(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    config: SpectrumConfig,
    scores: torch.Tensor | None = None,
    queries: Sequence[torch.Tensor] | None = None,
    num_tokens: int | None = None,
    fp8: FP8Pool | None = None,
) -> tuple[KVLayout, torch.Tensor]:
    """Score and allocate: the layout and the uint8 ``[T]`` tier map under the budget
    (FP8 keys are scored by their real values)."""
    _check_kv(keys, values)
    layout = make_layout(keys, config, num_tokens, fp8)
    if scores is None:
        real = [real_rows(k, layout, layer, key=True) for layer, k in enumerate(keys)]
        scores = score_tokens(
            real, queries, sinks=config.sinks, window=config.window, num_tokens=layout.num_tokens
        )
    elif scores.dim() == 2:
        scores = scores.float().mean(dim=0)
    if scores.shape != (layout.num_tokens,):
        raise SpectrumConfigError(
            f"scores must be [{layout.num_tokens}] or [layers, {layout.num_tokens}],"
            f" got {tuple(scores.shape)}"
        )
    budget = token_budget(layout, config)
    errors = None
    if config.method == "spectrum" and config.allocator == "optimal":
        errors = measure_tier_errors(keys, values, layout)
    tiers = allocate_tiers(scores, layout.token_costs(), budget, config, errors, layout.fp8)
    return layout, tiers


def pack_tiers(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    layout: KVLayout,
    tiers: torch.Tensor,
    policy: str = "",
) -> PackedKV:
    """Pack KV under a given tier map (uint8 ``[T]``) into a :class:`PackedKV`."""
    offsets, payload_nbytes = segment_offsets(layout, tiers)
    device = keys[0].device
    payload = torch.zeros(payload_nbytes, dtype=torch.uint8, device=device)
    tiers_dev = tiers.to(device)
    i = 0
    for tier in PACKED_TIERS:
        for layer in range(layout.num_layers):
            held = tiers_dev[layout.layer_first_pos[layer] :]
            rows = torch.nonzero(held == int(tier)).flatten()
            for kv, x in enumerate((keys[layer], values[layer])):
                if rows.numel():
                    seg = encode_rows(x[rows], tier, layout, key=kv == 0, layer=layer)
                    payload[offsets[i] : offsets[i] + seg.numel()] = seg
                i += 1
    header = PackedHeader(
        layout=layout,
        tier_map=tiers.cpu().to(torch.uint8).numpy().tobytes(),
        offsets=offsets,
        payload_nbytes=payload_nbytes,
        checksum=payload_checksum(payload),
        policy=policy,
    )
    return PackedKV(header=header, header_bytes=encode_header(header), payload=payload)


def pack_kv(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    config: SpectrumConfig,
    scores: torch.Tensor | None = None,
    queries: Sequence[torch.Tensor] | None = None,
    num_tokens: int | None = None,
    fp8: FP8Pool | None = None,
) -> PackedKV:
    """Score, allocate tiers and pack one request's KV cache.

    Args:
        keys, values: per layer ``[T_l, kv_heads, head_dim]`` (float16, bfloat16,
            float32, or FP8 as float8_e4m3fn / float8_e5m2 tensors), ``T_l <= T``; a
            layer with ``T_l < T`` holds the last ``T_l`` positions (sliding window).
        config: budget, tiers, allocator, method, codec options.
        scores: optional importance ``[T]`` or ``[L, T]``; computed otherwise.
        queries: optional per-layer post-RoPE queries of the last prompt
            positions ``[w, q_heads, head_dim]`` for attention-based scoring.
        num_tokens: prompt length T if no layer holds the whole prompt.
        fp8: the per-layer scales of float8 KV (default 1.0; dtype must match).

    Returns:
        :class:`PackedKV` with ``nbytes <= config.budget * full_nbytes`` (below the
        lossless budget, see :func:`token_budget`).
    """
    layout, tiers = plan_tiers(keys, values, config, scores, queries, num_tokens, fp8)
    policy = f"{config.method}/{config.allocator}/{config.tiers}/b={config.budget:g}"
    packed = pack_tiers(keys, values, layout, tiers, policy)
    limit = token_budget(layout, config) + fixed_overhead(layout)
    if packed.nbytes > limit:  # an accounting bug, never a user error
        raise AssertionError(f"packed {packed.nbytes} bytes over the budget of {limit}")
    return packed


@dataclass
class UnpackInfo:
    """What :func:`unpack_kv` did."""

    num_tokens: int
    dropped: torch.Tensor  # int64 positions not written (dropped by the allocation)
    tier_counts: dict[str, int]
    layout: KVLayout

    @classmethod
    def of(cls, header: PackedHeader) -> UnpackInfo:
        """What unpacking a buffer with this header writes and drops."""
        tier_map = header_tier_map(header)
        return cls(
            num_tokens=header.layout.num_tokens,
            dropped=torch.nonzero(tier_map == int(Tier.DROP)).flatten(),
            tier_counts=count_tiers(tier_map),
            layout=header.layout,
        )

    @property
    def kept(self) -> torch.Tensor:
        """bool ``[T]``: True where the position was written."""
        mask = torch.ones(self.num_tokens, dtype=torch.bool)
        mask[self.dropped] = False
        return mask


def iter_decoded_layers(header: PackedHeader, payload: torch.Tensor):
    """Yield ``(layer, positions, keys, values)`` per layer: the int64 positions
    (absolute, ascending) the layer carries and their float32 ``[n, H, D]`` rows."""
    layout = header.layout
    tier_map = header_tier_map(header).to(payload.device)
    seg_index = {}
    i = 0
    for tier in PACKED_TIERS:
        for layer in range(layout.num_layers):
            seg_index[(tier, layer)] = i
            i += 2
    for layer in range(layout.num_layers):
        first = layout.layer_first_pos[layer]
        held = tier_map[first:]
        pos_parts, k_parts, v_parts = [], [], []
        for tier in PACKED_TIERS:
            rows = torch.nonzero(held == int(tier)).flatten()
            n = rows.numel()
            if not n:
                continue
            j = seg_index[(tier, layer)]
            k_size, v_size = layout.seg_nbytes(tier, n, True), layout.seg_nbytes(tier, n, False)
            k_seg = payload[header.offsets[j] : header.offsets[j] + k_size]
            v_seg = payload[header.offsets[j + 1] : header.offsets[j + 1] + v_size]
            pos_parts.append(rows + first)
            k_parts.append(decode_rows(k_seg, n, tier, layout, key=True, layer=layer))
            v_parts.append(decode_rows(v_seg, n, tier, layout, key=False, layer=layer))
        if pos_parts:
            yield layer, torch.cat(pos_parts), torch.cat(k_parts), torch.cat(v_parts)


def _check_pools(layout: KVLayout, k_pools, v_pools, slot_indices, fp8=None) -> torch.Tensor:
    if len(k_pools) != layout.num_layers or len(v_pools) != layout.num_layers:
        raise SpectrumFormatError(
            f"buffer holds {layout.num_layers} layers, got {len(k_pools)} K and"
            f" {len(v_pools)} V pools"
        )
    check_fp8_pools([*k_pools, *v_pools], fp8, layout.num_layers, SpectrumFormatError)
    for layer, (k, v) in enumerate(zip(k_pools, v_pools)):
        want = (layout.num_kv_heads, layout.head_dim)
        if k.dim() != 3 or tuple(k.shape[1:]) != want or k.shape != v.shape:
            raise SpectrumFormatError(
                f"layer {layer}: pools must be [slots, {want[0]}, {want[1]}],"
                f" got {tuple(k.shape)} and {tuple(v.shape)}"
            )
    slots = torch.as_tensor(slot_indices)
    if slots.dim() != 1 or slots.numel() != layout.num_tokens or slots.dtype.is_floating_point:
        raise SpectrumFormatError(
            f"slot_indices must be an integer vector of {layout.num_tokens} slots,"
            f" got shape {tuple(slots.shape)} dtype {slots.dtype}"
        )
    slots = slots.to(torch.int64)
    size = min(int(k.shape[0]) for k in k_pools)
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= size):
        raise SpectrumFormatError(f"slot_indices out of range for pools of {size} slots")
    return slots


def unpack_kv(
    data: bytes | bytearray | memoryview | torch.Tensor,
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    slot_indices: torch.Tensor | Sequence[int],
    fp8: FP8Pool | None = None,
) -> UnpackInfo:
    """Validate a packed buffer and write its dequantised K and V into pools.

    Args:
        data: the whole buffer (bytes or uint8 tensor, any device).
        k_pools, v_pools: per layer ``[num_slots, kv_heads, head_dim]`` (SGLang's
            MHA pool layout; FlashInfer reads it as an NHD paged cache): float16,
            bfloat16 or float32, or FP8 pools (uint8 / float8) described by ``fp8``.
        slot_indices: int ``[T]``: the pool slot of each prompt position.
        fp8: FP8 destination pools: their dtype and per-layer scales; values are
            stored as ``(x / scale)`` saturated to FP8 (:func:`.fp8.quantize_fp8`).

    Everything is validated before the first write: on any error the pools
    are untouched. Dropped positions are reported in ``info.dropped``, not written.
    """
    header, payload = read_header(data)
    layout = header.layout
    slots = _check_pools(layout, k_pools, v_pools, slot_indices, fp8)
    for layer, positions, k, v in iter_decoded_layers(header, payload):
        dst = slots.to(k_pools[layer].device)[positions.to(k_pools[layer].device)]
        store_rows(k_pools[layer], dst, k, fp8, layer, key=True)
        store_rows(v_pools[layer], dst, v, fp8, layer, key=False)
    return UnpackInfo.of(header)


def decode_kv(
    data: bytes | bytearray | memoryview | torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Decode a buffer back into per-layer ``[T_l, H, D]`` K and V real values (zeros at
    dropped positions) and the bool ``[T]`` kept mask. ``dtype`` defaults to the source
    dtype (float32 for FP8 sources)."""
    header, payload = read_header(data)
    layout = header.layout
    dtype = dtype or _DTYPES.get(layout.dtype, torch.float32)
    keys, values = [], []
    for layer in range(layout.num_layers):
        shape = (layout.tokens_held(layer), layout.num_kv_heads, layout.head_dim)
        keys.append(torch.zeros(shape, dtype=dtype, device=payload.device))
        values.append(torch.zeros(shape, dtype=dtype, device=payload.device))
    for layer, positions, k, v in iter_decoded_layers(header, payload):
        local = positions - layout.layer_first_pos[layer]
        keys[layer][local] = k.to(dtype)
        values[layer][local] = v.to(dtype)
    return keys, values, header_tier_map(header) != int(Tier.DROP)
