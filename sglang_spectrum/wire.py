"""The wire format of a packed request: layout, header, segment offsets, checksums,
validation of received buffers (part of the codec, :mod:`.codec`).

The torch reference of every byte is :mod:`.codec` (quantisers in :mod:`.quant`); the
GPU kernels in ``sglang_spectrum.kernels`` write and read the very same bytes.

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
``scale = fp16((max - min) / qmax)``, ``minimum = fp16(min)`` (a zero word of
either is stored as +0.0, whichever signed zero min/max gave),
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

import struct
import warnings
import zlib
from collections.abc import Callable

import msgspec
import torch

from .config import SpectrumFormatError
from .fp8 import FP8_DTYPES, SCALE_MAX, SCALE_MIN, layer_scale
from .policy import QUANT_BITS, TIER_NAMES, Tier

FORMAT_VERSION = 2
MAGIC = b"SPKV"
PREFIX = struct.Struct("<4sHHII")
HEADER_ALIGN = 64
SEGMENT_ALIGN = 16
SCALE_BYTES = 4  # float16 scale + float16 minimum per group
PACKED_TIERS = (Tier.FP16, Tier.INT8, Tier.INT4)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SOURCE_DTYPES = {**_DTYPES, **FP8_DTYPES}  # what a layout's dtype may name


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


def encode_header(header: PackedHeader) -> bytes:
    """Prefix + msgpack header + zero padding to a multiple of 64 bytes."""
    body = msgspec.msgpack.encode(header)
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(body), zlib.crc32(body))
    raw = prefix + body
    return raw + bytes(_align(len(raw), HEADER_ALIGN) - len(raw))


def header_nbytes(header: PackedHeader) -> int:
    """``len(encode_header(header))``, without the prefix's checksum."""
    return _align(PREFIX.size + len(msgspec.msgpack.encode(header)), HEADER_ALIGN)


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
