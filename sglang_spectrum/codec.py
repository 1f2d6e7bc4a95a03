"""The packed KV codec (third layer of the data flow): quantise, pack, wire format, unpack.

This module is the torch reference of the format; the GPU kernels in
``sglang_spectrum.kernels`` write and read the very same bytes.

Wire format (version 2), one contiguous uint8 buffer per request::

    prefix  16 B   "<4sHHII": magic b"SPKV", format version, flags (0),
                   header length, CRC-32 of the header bytes
    header         msgspec/msgpack-encoded :class:`PackedHeader`
    padding        zeros up to a multiple of 64 bytes
    payload        segments, tier-major: for tier in (FP16, INT8, INT4),
                   for layer in 0..L-1, for K then V, one segment, each
                   starting at a multiple of 16 bytes (zero padding between).

A segment holds the rows (tokens, ascending position) of one layer that the
tier map puts in that tier:

    FP16   data   [n, kv_heads, head_dim]        16-bit (the pool dtype, or
                                                  float16 for float32 pools); for
                                                  FP8 sources the pool's own FP8
                                                  bytes, 1 byte each (the top tier)
    INT8   codes  [n, kv_heads, head_dim]        uint8
           scales [n, kv_heads, head_dim/g, 2]   float16 (scale, minimum)
    INT4   codes  [n, kv_heads, head_dim/2]      uint8, element 2j in the low
                                                  nibble, 2j+1 in the high one
           scales [n, kv_heads, head_dim/g, 2]   float16 (scale, minimum)

Quantisation is asymmetric per (token, KV head, group of g along head_dim):
``scale = fp16((max - min) / qmax)``, ``minimum = fp16(min)``,
``q = clamp(floor((x - minimum) / scale + 1/2), 0, qmax)``,
``x_hat = q * scale + minimum`` (float32 arithmetic). With
``rotation="hadamard"`` each head vector is multiplied by the orthonormal
Hadamard matrix before quantisation and again after dequantisation.

With ``layout.key_block = B > 0`` (``key_scales="channel"``) the INT8/INT4
*key* segments keep the same codes but scale per channel over blocks of B
consecutive rows of the segment (KIVI): scales ``[ceil(n/B), kv_heads,
head_dim, 2]`` float16, same formulas with min/max taken over the block's rows.
Value segments are unchanged.

FP8 sources (``layout.dtype`` ``float8_e4m3fn`` / ``float8_e5m2``, SGLang's FP8 KV
cache, see :mod:`.fp8`): ``layout.kv_scales`` holds the 2L per-tensor scales (K of
every layer, then V; real value = ``fp8 * scale``). The top tier carries the stored
FP8 bytes unchanged (lossless); INT8/INT4 quantise the real (scaled) values, so a
receiver reads real values whatever its own pool and scales. The tier map still
names the top tier ``FP16`` (``Tier.FP16``, ``"fp16"`` in tier counts): the
source's own precision. Version 1 had no ``kv_scales`` and no FP8 sources.

Layers whose cache holds only a suffix of the prompt (sliding window) carry
only the positions they hold: layer l holds ``layer_first_pos[l] .. T-1``.
Dropped tokens appear in the tier map only.

Byte accounting: ``full_nbytes`` is the 16-bit size of everything the layers
hold (for FP8 sources too: budgets stay relative to the 16-bit KV, so a budget of
0.5 carries an FP8 source losslessly); ``nbytes`` is the whole buffer (prefix,
header, padding and payload).
"""

from __future__ import annotations

import math
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import msgspec
import torch

from .config import SpectrumConfig, SpectrumConfigError, SpectrumFormatError
from .fp8 import (
    FP8_DTYPES,
    SCALE_MAX,
    SCALE_MIN,
    FP8Pool,
    as_scale,
    check_fp8_pools,
    dequantize_fp8,
    dtype_name,
    layer_scale,
    store_rows,
)
from .policy import QUANT_BITS, TIER_NAMES, Tier, allocate_tiers, allowed_tiers
from .scoring import infer_layer_first_pos, score_tokens

FORMAT_VERSION = 2
MAGIC = b"SPKV"
PREFIX = struct.Struct("<4sHHII")
HEADER_ALIGN = 64
SEGMENT_ALIGN = 16
SCALE_BYTES = 4  # float16 scale + float16 minimum per group
PACKED_TIERS = (Tier.FP16, Tier.INT8, Tier.INT4)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SOURCE_DTYPES = {**_DTYPES, **FP8_DTYPES}  # what a layout's dtype may name
_FP16_MAX = 65504.0


class KVLayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Shape of one request's KV cache as the codec sees it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # source dtype: "float16" | "bfloat16" | "float32" | "float8_e4m3fn" | "float8_e5m2"
    group_size: int
    num_tokens: int
    layer_first_pos: list[int]
    rotation: str = "none"
    key_block: int = 0  # > 0: INT8/INT4 keys scaled per channel over blocks of this many rows
    kv_scales: list[float] = []  # FP8 sources: K scale of each layer, then V (else empty)

    @property
    def fp8(self) -> bool:
        """True for an FP8 source (its top tier is 1 byte per element)."""
        return self.dtype in FP8_DTYPES

    @property
    def wire_dtype(self) -> torch.dtype:
        """dtype of the top (FP16) tier on the wire: 16-bit, or the source's FP8 dtype."""
        if self.fp8:
            return FP8_DTYPES[self.dtype]
        return _DTYPES[self.dtype] if self.dtype != "float32" else torch.float16

    @property
    def top_bytes(self) -> int:
        """Bytes per element of the top tier: 2, or 1 for FP8 sources."""
        return 1 if self.fp8 else 2

    @property
    def lossless_budget(self) -> float:
        """Smallest budget at which every token goes in the top tier (header on top)."""
        return self.top_bytes / 2

    def scale(self, layer: int, key: bool) -> float:
        """FP8 scale of ``layer``'s K (``key``) or V; 1.0 for 16-bit sources."""
        return layer_scale(self.kv_scales, layer, key)

    @property
    def groups(self) -> int:
        return self.head_dim // self.group_size

    def tokens_held(self, layer: int) -> int:
        return self.num_tokens - self.layer_first_pos[layer]

    def key_scaled_per_channel(self, tier: Tier) -> bool:
        return self.key_block > 0 and tier in (Tier.INT8, Tier.INT4)

    def seg_nbytes(self, tier: Tier, rows: int, key: bool) -> int:
        """Bytes of a segment of ``rows`` K (``key``) or V rows at ``tier``."""
        if key and self.key_scaled_per_channel(tier):
            elems = self.num_kv_heads * self.head_dim
            blocks = -(-rows // self.key_block)
            return rows * elems * QUANT_BITS[tier] // 8 + blocks * elems * SCALE_BYTES
        return rows * self.row_nbytes(tier)

    def key_row_nbytes(self, tier: Tier) -> int:
        """Budgeted bytes of one K row: :meth:`row_nbytes`, or with per-channel key
        scales the codes plus the block's scales spread over its rows (rounded up;
        a last, partial block is in :func:`fixed_overhead`)."""
        if not self.key_scaled_per_channel(tier):
            return self.row_nbytes(tier)
        elems = self.num_kv_heads * self.head_dim
        return elems * QUANT_BITS[tier] // 8 + -(-elems * SCALE_BYTES // self.key_block)

    def row_nbytes(self, tier: Tier) -> int:
        """Bytes of one token of one layer at ``tier`` (data + scales): a V row, and a
        K row unless keys are scaled per channel (see :meth:`key_row_nbytes`)."""
        elems = self.num_kv_heads * self.head_dim
        scales = self.num_kv_heads * self.groups * SCALE_BYTES
        return {
            Tier.FP16: self.top_bytes * elems,
            Tier.INT8: elems + scales,
            Tier.INT4: elems // 2 + scales,
            Tier.DROP: 0,
        }[Tier(tier)]

    @property
    def full_nbytes(self) -> int:
        """Size of everything the layers hold at 16 bit (the budget's denominator)."""
        held = sum(self.tokens_held(layer) for layer in range(self.num_layers))
        return held * 2 * 2 * self.num_kv_heads * self.head_dim

    def token_costs(self) -> torch.Tensor:
        """int64 ``[T, 4]``: payload bytes of each token at each tier, all layers, K and V."""
        held = torch.zeros(self.num_tokens, dtype=torch.int64)
        for first in self.layer_first_pos:
            held[first:] += 1
        per_row = torch.tensor(
            [self.key_row_nbytes(t) + self.row_nbytes(t) for t in Tier], dtype=torch.int64
        )
        return held[:, None] * per_row[None, :]

    def validate(self) -> None:
        """Raise :class:`SpectrumFormatError` if the layout is not self-consistent."""
        problems = []
        if self.num_layers < 1 or self.num_kv_heads < 1 or self.num_tokens < 1:
            problems.append("layers, KV heads and tokens must be >= 1")
        if self.head_dim < 2 or self.head_dim % 2:
            problems.append(f"head_dim must be even, got {self.head_dim}")
        if self.group_size < 2 or self.head_dim % max(self.group_size, 1):
            problems.append(f"group_size {self.group_size} must divide head_dim {self.head_dim}")
        if self.dtype not in SOURCE_DTYPES:
            problems.append(f"unknown dtype {self.dtype!r}")
        want = 2 * self.num_layers if self.fp8 else 0
        if len(self.kv_scales) != want:
            problems.append(f"{want} kv_scales expected, got {len(self.kv_scales)}")
        elif not all(isinstance(s, float) and SCALE_MIN <= s <= SCALE_MAX for s in self.kv_scales):
            problems.append("kv_scales must be floats in [2**-100, 2**100]")
        if self.rotation not in ("none", "hadamard"):
            problems.append(f"unknown rotation {self.rotation!r}")
        if self.key_block < 0 or self.key_block == 1:
            problems.append(f"key_block must be 0 or >= 2, got {self.key_block}")
        if len(self.layer_first_pos) != self.num_layers or any(
            not 0 <= p <= self.num_tokens for p in self.layer_first_pos
        ):
            problems.append("layer_first_pos must give one position in [0, T] per layer")
        if problems:
            raise SpectrumFormatError("invalid layout: " + "; ".join(problems))


class PackedHeader(msgspec.Struct, forbid_unknown_fields=True):
    """Everything needed to read the payload; encoded with msgpack."""

    layout: KVLayout
    tier_map: bytes  # uint8[num_tokens], values of Tier
    offsets: list[int]  # segment starts in the payload, index (tier * L + layer) * 2 + kv
    payload_nbytes: int
    checksum: int  # payload_checksum(payload)
    policy: str = ""  # informational, e.g. "spectrum/paper/3/b=0.5"


def header_tier_map(header: PackedHeader) -> torch.Tensor:
    """uint8 ``[T]`` tier map of a header (a CPU tensor over a copy of its bytes)."""
    return torch.frombuffer(bytearray(header.tier_map), dtype=torch.uint8)


def count_tiers(tier_map: torch.Tensor) -> dict[str, int]:
    """Tokens per tier name of a uint8 tier map."""
    counts = torch.bincount(tier_map.long().cpu(), minlength=4)
    return {name: int(c) for name, c in zip(TIER_NAMES, counts)}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def segment_offsets(layout: KVLayout, tier_map: torch.Tensor) -> tuple[list[int], int]:
    """Segment start offsets (see :class:`PackedHeader`) and the payload size."""
    offsets, pos = [], 0
    tier_map = tier_map.cpu()
    for tier in PACKED_TIERS:
        for layer in range(layout.num_layers):
            n = int((tier_map[layout.layer_first_pos[layer] :] == int(tier)).sum())
            for kv in range(2):
                pos = _align(pos, SEGMENT_ALIGN)
                offsets.append(pos)
                pos += layout.seg_nbytes(tier, n, key=kv == 0)
    return offsets, pos


def fixed_overhead(layout: KVLayout) -> int:
    """Upper bound of the bytes a buffer spends besides token data: prefix,
    header (tier map included), header padding, segment alignment."""
    worst = PackedHeader(
        layout=layout,
        tier_map=bytes(layout.num_tokens),
        offsets=[2**63 - 1] * (len(PACKED_TIERS) * layout.num_layers * 2),
        payload_nbytes=2**63 - 1,
        checksum=2**63 - 1,
        policy="x" * 64,
    )
    header = PREFIX.size + len(msgspec.msgpack.encode(worst))
    segments = len(PACKED_TIERS) * layout.num_layers * 2
    # per-channel key scales: each K segment may end in a partial block
    partial = sum(
        layout.num_kv_heads * layout.head_dim * SCALE_BYTES
        for tier in PACKED_TIERS
        if layout.key_scaled_per_channel(tier)
    )
    return (
        _align(header, HEADER_ALIGN) + segments * (SEGMENT_ALIGN - 1) + partial * layout.num_layers
    )


def payload_checksum(payload: torch.Tensor) -> int:
    """Position-weighted 62-bit checksum of a uint8 tensor, on its own device.

    Sums of 32-bit words and of words times (index mod 65521 + 1), reduced
    modulo 2**31 - 1 in chunks so no int64 ever overflows: exact, hence the
    same on CPU and GPU whatever the reduction order.
    """
    p = (1 << 31) - 1
    chunk = 1 << 15
    flat = payload.reshape(-1)
    pad = (-flat.numel()) % (4 * chunk)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % 65521 + 1
    s1 = (words.view(-1, chunk).sum(1) % p).sum() % p
    s2 = ((words * weights).view(-1, chunk).sum(1) % p).sum() % p
    return (int(s2) << 31) | int(s1)


@lru_cache(maxsize=8)
def _hadamard_cpu(dim: int) -> torch.Tensor:
    if dim & (dim - 1):
        raise SpectrumConfigError(f"rotation 'hadamard' needs a power-of-two head_dim, got {dim}")
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)


def hadamard(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal, symmetric Sylvester-Hadamard matrix ``[dim, dim]`` (its own inverse)."""
    return _hadamard_cpu(dim).to(device)


def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-group quantisation along the last dim.

    Args:
        x: ``[N, H, D]`` float tensor.
    Returns:
        codes: uint8 ``[N, H, D]`` (8 bit) or ``[N, H, D/2]`` (4 bit, two per byte).
        scales: float16 ``[N, H, D/g, 2]`` holding (scale, minimum).
    """
    n, h, d = x.shape
    q, scales = _quantize_groups(x.float().reshape(n, h, d // group_size, group_size), bits)
    return _pack_codes(q.reshape(n, h, d), bits), scales


def _quantize_groups(xg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The format's arithmetic on float32 groups along the last dim: uint8 codes
    (same shape) and float16 ``[..., 2]`` (scale, minimum) per group."""
    qmax = (1 << bits) - 1
    xg = xg.clamp(-_FP16_MAX, _FP16_MAX)
    lo = xg.amin(-1)
    scale = ((xg.amax(-1) - lo) / qmax).to(torch.float16)
    minimum = lo.to(torch.float16)
    s, m = scale.float(), minimum.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = torch.floor((xg - m[..., None]) * inv[..., None] + 0.5).clamp_(0, qmax).to(torch.uint8)
    return q, torch.stack([scale, minimum], dim=-1)


def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` -> two 4-bit codes per byte along D (8 bit: as is)."""
    return q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q


def _unpack_codes(codes: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1)
    return codes.reshape(*codes.shape[:2], head_dim)


def quantize_channels(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric quantisation with one (scale, minimum) per channel over blocks of
    ``block`` consecutive rows (KIVI's key quantisation); same rounding as :func:`quantize`.

    Args:
        x: ``[N, H, D]`` float tensor.
    Returns:
        codes: uint8 ``[N, H, D]`` (8 bit) or ``[N, H, D/2]`` (4 bit, two per byte).
        scales: float16 ``[ceil(N / block), H, D, 2]`` holding (scale, minimum).
    """
    n, h, d = x.shape
    nb = -(-n // block)
    xf = x.float()
    pad = xf[-1:].expand(nb * block - n, h, d)  # repeats a row: min/max unchanged
    xb = torch.cat([xf, pad]).reshape(nb, block, h, d)
    q, scales = _quantize_groups(xb.permute(0, 2, 3, 1), bits)  # groups: a block's rows
    q = q.permute(0, 3, 1, 2).reshape(nb * block, h, d)[:n]
    return _pack_codes(q, bits), scales


def dequantize_channels(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, head_dim: int, block: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_channels`: float32 ``[N, H, head_dim]``."""
    q = _unpack_codes(codes, bits, head_dim).float()
    rows = torch.arange(q.shape[0], device=q.device) // block
    s, m = scales[rows, ..., 0].float(), scales[rows, ..., 1].float()
    return q * s + m


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: float32 ``[N, H, head_dim]``."""
    n, h = codes.shape[:2]
    groups = scales.shape[2]
    q = _unpack_codes(codes, bits, head_dim).float().reshape(n, h, groups, head_dim // groups)
    s, m = scales[..., 0].float(), scales[..., 1].float()
    return (q * s[..., None] + m[..., None]).reshape(n, h, head_dim)


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


def encode_header(header: PackedHeader) -> bytes:
    """Prefix + msgpack header + zero padding to a multiple of 64 bytes."""
    body = msgspec.msgpack.encode(header)
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(body), zlib.crc32(body))
    raw = prefix + body
    return raw + bytes(_align(len(raw), HEADER_ALIGN) - len(raw))


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


def _as_uint8(data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise SpectrumFormatError(f"packed buffer tensor must be uint8, got {data.dtype}")
        return data.reshape(-1)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SpectrumFormatError(
            f"packed buffer must be bytes or a uint8 tensor, got {type(data)}"
        )
    if len(data) == 0:
        raise SpectrumFormatError("packed buffer is empty")
    with warnings.catch_warnings():  # read-only use of a read-only buffer
        warnings.simplefilter("ignore")
        return torch.frombuffer(data, dtype=torch.uint8)


def _read_prefix(buf: torch.Tensor, head_nbytes: int = PREFIX.size) -> tuple[bytes, int, int, int]:
    """Validate the prefix of the uint8 buffer ``buf`` and that it holds the whole header;
    (its first ``head_nbytes`` bytes, fewer if it is shorter; header length; header CRC;
    payload start). One device-to-host copy.
    """
    total = buf.numel()
    if total < PREFIX.size:
        raise SpectrumFormatError(f"buffer of {total} bytes is shorter than the 16-byte prefix")
    head = buf[: min(total, head_nbytes)].cpu().numpy().tobytes()
    magic, version, flags, header_len, header_crc = PREFIX.unpack(head[: PREFIX.size])
    if magic != MAGIC:
        raise SpectrumFormatError(f"not a SpectrumKV buffer (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise SpectrumFormatError(
            f"format version mismatch: buffer is v{version}, this SpectrumKV reads"
            f" v{FORMAT_VERSION}; run the same sglang-spectrum version on prefill and decode"
        )
    if flags != 0:
        raise SpectrumFormatError(f"unknown flags {flags:#x} in the prefix")
    payload_start = _align(PREFIX.size + header_len, HEADER_ALIGN)
    if total < payload_start:
        raise SpectrumFormatError(
            f"truncated buffer: {total} bytes, the header alone needs {payload_start}"
        )
    return head, header_len, header_crc, payload_start


def _decode_header(body: bytes, header_crc: int) -> PackedHeader:
    """Check the header's CRC, decode it, validate its layout and tier map."""
    if zlib.crc32(body) != header_crc:
        raise SpectrumFormatError("header checksum mismatch: the header is corrupted")
    try:
        header = msgspec.msgpack.decode(body, type=PackedHeader)
    except msgspec.DecodeError as exc:
        raise SpectrumFormatError(f"malformed header: {exc}") from None
    layout = header.layout
    layout.validate()
    if len(header.tier_map) != layout.num_tokens:
        raise SpectrumFormatError(
            f"tier map has {len(header.tier_map)} entries for {layout.num_tokens} tokens"
        )
    if header.tier_map and max(header.tier_map) > int(Tier.DROP):
        raise SpectrumFormatError(f"tier map holds an unknown tier {max(header.tier_map)}")
    return header


def _check_extent(
    header: PackedHeader, offsets: list[int], payload_nbytes: int, total: int, payload_start: int
) -> None:
    """Check the header's segment offsets and payload size against those computed from its
    tier map and layout, and that a buffer of ``total`` bytes holds the payload."""
    if header.offsets != offsets or header.payload_nbytes != payload_nbytes:
        raise SpectrumFormatError("segment offsets disagree with the tier map and layout")
    if total < payload_start + payload_nbytes:
        raise SpectrumFormatError(
            f"truncated buffer: {total} bytes, expected {payload_start + payload_nbytes}"
        )


def read_header(
    data: bytes | bytearray | memoryview | torch.Tensor,
    checksum: Callable[[torch.Tensor], int] = payload_checksum,
) -> tuple[PackedHeader, torch.Tensor]:
    """Parse and validate a packed buffer; returns (header, payload view).

    Checks magic, version, header CRC, layout consistency, segment offsets,
    length and payload checksum (``checksum``: this reference, or a faster
    function computing the same value, e.g. the GPU kernel's). Trailing bytes
    after the payload are ignored (receive buffers may be larger than the message).

    Raises:
        SpectrumFormatError: anything malformed, truncated, corrupted or of
            another format version.
    """
    buf = _as_uint8(data)
    _, header_len, header_crc, payload_start = _read_prefix(buf)
    body = buf[PREFIX.size : PREFIX.size + header_len].cpu().numpy().tobytes()
    header = _decode_header(body, header_crc)
    offsets, payload_nbytes = segment_offsets(header.layout, header_tier_map(header))
    _check_extent(header, offsets, payload_nbytes, buf.numel(), payload_start)
    payload = buf[payload_start : payload_start + payload_nbytes]
    if checksum(payload) != header.checksum:
        raise SpectrumFormatError("payload checksum mismatch: the KV data is corrupted")
    return header, payload


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
