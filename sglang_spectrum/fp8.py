"""FP8 KV pools (SGLang ``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``): what their bytes mean,
and the torch reference of reading and writing them.

SGLang (0.5.23, ``mem_cache/memory_pool.py``, ``MHATokenToKVPool``) keeps an FP8 KV cache
in per-layer K and V buffers ``[num_slots, kv_heads, head_dim]`` of ``torch.uint8`` (its
``store_dtype``: ``index_put`` is not implemented for float8) holding the bits of its
logical ``dtype`` (``torch.float8_e4m3fn`` or ``torch.float8_e5m2``). ``set_kv_buffer``
writes ``(k / k_scale).to(dtype)`` (no division when the layer has no scale) and the
attention backends read ``fp8 * k_scale`` (FlashInfer: the ``k_scale`` / ``v_scale``
arguments of ``run``); the scales are per-tensor floats per layer,
``RadixAttention.k_scale_float`` / ``v_scale_float``, set when the checkpoint provides
them and 1.0 (None) otherwise.

SpectrumKV's arithmetic (the torch reference here; the Triton kernels write the same bytes):

- real value of a stored byte: ``x = float32(fp8) * float32(scale)``;
- storing a real float32 value: ``fp8 = (x / scale).clamp(-max, max).to(dtype)``: IEEE
  float32 division (skipped for scale 1.0, where it is exact), saturated to the largest
  finite value (448 for e4m3fn, 57344 for e5m2) before the round-to-nearest-even cast.
  SGLang's Triton store kernel saturates the same way; the plain casts of torch differ
  between versions and formats (e5m2 overflows to inf), so the clamp makes it definite.

Scales are float32 values in ``[2**-100, 2**100]`` (so ``fp8 * scale`` is a normal float32
or zero): then storing a value read with the same dtype and scale gives back the very
same byte (``(f * s) / s`` is within a float32 ulp of ``f``, far from the next FP8 value).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import SpectrumConfigError

FP8_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# SGLang's --kv-cache-dtype spellings
_ALIASES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
FP8_KIND = {"float8_e4m3fn": 1, "float8_e5m2": 2}  # the kernels' constexpr code (0: not FP8)
SCALE_MIN, SCALE_MAX = 2.0**-100, 2.0**100


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"bfloat16"``, ``"float8_e4m3fn"``, ... of a torch dtype or name (SGLang's
    ``fp8_e4m3`` / ``fp8_e5m2`` included); not validated."""
    name = str(dtype).removeprefix("torch.")
    return _ALIASES.get(name, name)


def is_fp8(dtype: torch.dtype | str) -> bool:
    return dtype_name(dtype) in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype."""
    return float(torch.finfo(dtype).max)


def as_scale(value: float | None, what: str = "scale") -> float:
    """A valid FP8 scale as the float32 value it will be used as (None: 1.0)."""
    if value is None:
        return 1.0
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SpectrumConfigError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v) or not SCALE_MIN <= v <= SCALE_MAX:
        raise SpectrumConfigError(f"{what} must be finite and in [2**-100, 2**100], got {v!r}")
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _per_layer(scales, num_layers: int, what: str) -> tuple[float, ...]:
    if scales is None or isinstance(scales, (int, float)):
        return (as_scale(scales, what),) * num_layers
    if isinstance(scales, torch.Tensor):
        scales = scales.detach().cpu().reshape(-1).tolist()
    scales = list(scales)
    if len(scales) != num_layers:
        raise SpectrumConfigError(f"{what}: {len(scales)} values for {num_layers} layers")
    return tuple(as_scale(s, f"{what}[{i}]") for i, s in enumerate(scales))


@dataclass(frozen=True)
class FP8Pool:
    """What the bytes of an FP8 KV pool mean: its float8 dtype and per-layer scales.

    The pools themselves are passed as SGLang stores them: per layer a uint8 ``[num_slots,
    kv_heads, head_dim]`` K and V buffer (``token_to_kv_pool.k_buffer[l]``; a
    ``.view(dtype)`` float8 tensor is accepted too). Build it with :meth:`of`.

    Attributes:
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` (SGLang:
            ``token_to_kv_pool.dtype``).
        k_scales, v_scales: per layer, float32 values; real value = ``fp8 * scale``
            (SGLang: ``layer.k_scale_float`` / ``v_scale_float``, 1.0 where None).
    """

    dtype: torch.dtype
    k_scales: tuple[float, ...]
    v_scales: tuple[float, ...]

    def __post_init__(self) -> None:
        name = dtype_name(self.dtype)
        if name not in FP8_DTYPES:
            raise SpectrumConfigError(
                f"FP8 pools must be float8_e4m3fn or float8_e5m2, got {self.dtype}"
            )
        object.__setattr__(self, "dtype", FP8_DTYPES[name])
        n = len(self.k_scales)
        object.__setattr__(self, "k_scales", _per_layer(self.k_scales, n, "k_scales"))
        object.__setattr__(self, "v_scales", _per_layer(self.v_scales, n, "v_scales"))
        if n < 1:
            raise SpectrumConfigError("an FP8 pool needs scales for at least one layer")

    def layers(self, first: int, end: int) -> FP8Pool:
        """The pools of layers ``[first, end)`` (a layer group's part)."""
        if first == 0 and end == len(self.k_scales):
            return self
        return FP8Pool(self.dtype, self.k_scales[first:end], self.v_scales[first:end])

    @classmethod
    def of(
        cls,
        dtype: torch.dtype | str,
        num_layers: int,
        k_scales: float | Sequence[float | None] | torch.Tensor | None = None,
        v_scales: float | Sequence[float | None] | torch.Tensor | None = None,
    ) -> FP8Pool:
        """``dtype`` (torch dtype, ``"float8_e4m3fn"`` or SGLang's ``"fp8_e4m3"``...) and
        scales: None (1.0 everywhere), one float for every layer, or one per layer
        (None entries are 1.0)."""
        name = dtype_name(dtype)
        if name not in FP8_DTYPES:
            raise SpectrumConfigError(f"not an FP8 KV dtype: {dtype}")
        return cls(
            FP8_DTYPES[name],
            _per_layer(k_scales, num_layers, "k_scales"),
            _per_layer(v_scales, num_layers, "v_scales"),
        )

    @classmethod
    def from_scales(cls, dtype: torch.dtype | str, scales: Sequence[float]) -> FP8Pool:
        """From the ``2L`` scales of :attr:`scales` (``KVLayout.kv_scales``)."""
        half = len(scales) // 2
        return cls.of(dtype, half, scales[:half], scales[half:])

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def num_layers(self) -> int:
        return len(self.k_scales)

    @property
    def scales(self) -> list[float]:
        """The ``2L`` scales as the wire format lists them: K of every layer, then V."""
        return [*self.k_scales, *self.v_scales]

    def scale(self, layer: int, key: bool) -> float:
        return (self.k_scales if key else self.v_scales)[layer]


def layer_scale(scales: Sequence[float], layer: int, key: bool) -> float:
    """Scale of ``layer``'s K (``key``) or V from a ``2L`` list (K then V); 1.0 if empty."""
    if not scales:
        return 1.0
    return scales[layer if key else len(scales) // 2 + layer]


def _scalar(scale: float, device: torch.device) -> torch.Tensor:
    """float32 ``[1]`` (a tensor, not a Python scalar: CUDA divides by a scalar through
    its reciprocal, not by IEEE division)."""
    return torch.tensor([scale], dtype=torch.float32, device=device)


def dequantize_fp8(bits: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """float32 real values ``float(fp8) * scale`` of uint8 (or float8) FP8 bits, any shape."""
    x = bits.contiguous().view(torch.uint8).view(dtype).float()
    return x if scale == 1.0 else x * _scalar(scale, x.device)


def quantize_fp8(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """uint8 FP8 bits of real values ``x``: ``(x / scale)`` saturated, rounded to nearest even."""
    xf = x.float()
    if scale != 1.0:
        xf = xf / _scalar(scale, xf.device)
    top = fp8_max(dtype)
    return xf.clamp(-top, top).to(dtype).view(torch.uint8)


def store_rows(
    pool: torch.Tensor,
    rows: torch.Tensor,
    x: torch.Tensor,
    fp8: FP8Pool | None = None,
    layer: int = 0,
    key: bool = True,
    heads: tuple[int, int] | None = None,
) -> None:
    """Write float32 rows ``x`` ``[n, H, D]`` at pool slots ``rows`` ``[n]`` (heads ``[g0,
    g1)`` of a pool of more heads, ``g1 - g0 = H``; None: all of them): cast to the pool's
    dtype, or (``fp8``) stored as that pool's FP8 bits with its layer scale."""
    h = slice(None) if heads is None else slice(*heads)
    if fp8 is None:
        pool[rows, h] = x.to(pool.device, pool.dtype)
    else:
        bits = quantize_fp8(x, fp8.dtype, fp8.scale(layer, key))
        pool.view(torch.uint8)[rows, h] = bits.to(pool.device)


def pool_bytes(pools: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 views of FP8 pools given as uint8 or float8 tensors."""
    return [p if p.dtype == torch.uint8 else p.view(torch.uint8) for p in pools]


def check_fp8_pools(
    pools: Sequence[torch.Tensor], fp8: FP8Pool | None, num_layers: int, error
) -> None:
    """``fp8`` None: pools must be 16/32-bit floats; else uint8 or ``fp8.dtype`` tensors with
    scales for ``num_layers`` layers. Raises ``error``."""
    dtype = pools[0].dtype
    if fp8 is None:
        if dtype == torch.uint8 or is_fp8(dtype):
            raise error(
                f"{dtype} pools are FP8 KV: pass fp8=FP8Pool.of(dtype, layers, k_scales,"
                " v_scales) saying what their bytes mean"
            )
        return
    if not isinstance(fp8, FP8Pool):
        raise error(f"fp8 must be an FP8Pool, got {type(fp8)}")
    if dtype not in (torch.uint8, fp8.dtype):
        raise error(f"FP8 pools ({fp8.name}) must be uint8 or {fp8.name} tensors, got {dtype}")
    if fp8.num_layers != num_layers:
        raise error(f"FP8Pool has scales for {fp8.num_layers} layers, the pools {num_layers}")
