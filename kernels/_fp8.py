"""FP8 in the kernels: exact bit-level conversions, storing values as a destination
pool holds them (any pool dtype), and the per-layer scale tables.

The conversions are integer arithmetic plus one float32 addition (and an exact float32
product for FP8 subnormals), so compiled and interpreted kernels give the same bits as
the torch reference (:mod:`..fp8`), signed zeros included (no float negation):
Triton's interpreter rounds subnormal FP8 values wrongly and ignores NaN/inf, and
doing it by hand on the GPU too keeps one definition of every byte. ``KIND``: 1 =
float8_e4m3fn (bias 7, 3 mantissa bits, max 448, no inf), 2 = float8_e5m2 (bias 15,
2 mantissa bits, max 57344).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..codec import KVLayout
from ..fp8 import FP8_KIND, FP8Pool


@triton.jit
def from_fp8(b, KIND: tl.constexpr):
    """float32 ``[...]`` values of uint8 FP8 bits ``b``: the bits torch's CPU cast gives
    for all 256 patterns (signed zeros, NaN payloads and inf included).

    Built as integer bits, sign last (``| sign << 24``), never as a float negation:
    Triton releases without triton-lang/triton#10270 (May 2026; the H200 run's 3.6)
    compile ``-x`` as ``0.0 - x``, so byte 0x80 (-0.0) decoded as +0.0 there, while
    the CPU tests' interpreter (3.9: ``np.negative``) kept -0.0.
    """
    u = b.to(tl.uint32)
    m = u & 0x7F
    if KIND == 1:  # e4m3fn: normal 2**(e-7) * (1 + f/8), subnormal f * 2**-9; 0x7F NaN
        normal = (m << 20) + (120 << 23)
        tiny = (m.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)  # exact
        mag = tl.where(m >= 8, normal, tiny)
        mag = tl.where(m == 0x7F, (m << 20) | 0x7F800000, mag)  # torch: 0x7FF00000
    else:  # e5m2: normal 2**(e-15) * (1 + f/4), subnormal f * 2**-16; 0x7C inf, above NaN
        normal = (m << 21) + (112 << 23)
        tiny = (m.to(tl.float32) * 1.52587890625e-05).to(tl.uint32, bitcast=True)  # exact
        mag = tl.where(m >= 4, normal, tiny)
        special = (m << 21) | 0x7F800000  # inf, or a NaN with its payload, quieted:
        special = tl.where(m > 0x7C, special | 0x400000, special)  # torch (via float16)
        mag = tl.where(m >= 0x7C, special, mag)
    return (mag | ((u & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def to_fp8(x, KIND: tl.constexpr):
    """uint8 FP8 bits of float32 ``x``: saturated to the largest finite value, rounded to
    nearest even (torch: ``x.clamp(-max, max).to(fp8)``)."""
    if KIND == 1:
        top = 448.0
    else:
        top = 57344.0
    x = tl.minimum(tl.maximum(x, -top), top)
    u = x.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    # subnormal results: |x| + 2**k has an ulp of exactly one FP8 subnormal step, so the
    # float32 addition rounds to nearest even and its low bits count the steps
    if KIND == 1:
        rne = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20  # round the mantissa to 3 bits
        sub = (tl.abs(x) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
        mag = tl.where(a >= 0x3C800000, rne - 960, sub)  # 2**-6: smallest normal
    else:
        rne = (a + 0xFFFFF + ((a >> 21) & 1)) >> 21  # round the mantissa to 2 bits
        sub = (tl.abs(x) + 128.0).to(tl.uint32, bitcast=True) - 0x43000000
        mag = tl.where(a >= 0x38800000, rne - 448, sub)  # 2**-14: smallest normal
    return (mag | ((u >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def cast(x, DST: tl.constexpr, SOFT_BF16: tl.constexpr):
    """``x.to(DST)``; SOFT_BF16 rounds to bf16 to nearest even by hand (the CPU
    interpreter truncates, the GPU's cvt.rn rounds like torch)."""
    if SOFT_BF16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DST)


@triton.jit
def to_pool(
    x, sd, DST: tl.constexpr, SOFT_BF16: tl.constexpr, DFP8: tl.constexpr, DDIV: tl.constexpr
):
    """Values ``x`` as the destination pool stores them: :func:`cast` to ``DST``, or for
    an FP8 pool (``DFP8``) the bits of ``x / sd`` (IEEE division, skipped when every
    destination scale is 1.0: ``not DDIV``)."""
    if DFP8:
        xf = x.to(tl.float32)
        if DDIV:
            xf = tl.math.div_rn(xf, tl.zeros_like(xf) + sd)
        return to_fp8(xf, DFP8)
    else:
        return cast(x, DST, SOFT_BF16)


def fp8_kind(name: str) -> int:
    """The kernels' constexpr code of a dtype name: 0 (not FP8), 1 (e4m3fn), 2 (e5m2)."""
    return FP8_KIND.get(name, 0)


_SCALES: dict[tuple, torch.Tensor] = {}


def scale_table(scales: Sequence[float], num_layers: int, device: torch.device) -> torch.Tensor:
    """float32 ``[2L]`` device table of per-layer scales (K of every layer, then V; all 1.0
    when ``scales`` is empty), cached."""
    key = (str(device), num_layers, tuple(scales))
    hit = _SCALES.get(key)
    if hit is None:
        values = list(scales) if scales else [1.0] * (2 * num_layers)
        if len(_SCALES) >= 64:
            _SCALES.clear()
        hit = _SCALES[key] = torch.tensor(values, dtype=torch.float32).to(device)
    return hit


def dest_args(fp8: FP8Pool | None, num_layers: int, device: torch.device) -> tuple:
    """(scale table, DFP8, DDIV) of destination pools described by ``fp8`` (None: 16-bit)."""
    if fp8 is None:
        return scale_table((), num_layers, device), 0, False
    table = scale_table(fp8.scales, num_layers, device)
    return table, fp8_kind(fp8.name), any(s != 1.0 for s in fp8.scales)


def source_args(layout: KVLayout, dtype: torch.dtype, device: torch.device) -> tuple:
    """(scale table, FP8 kind) of pools of ``dtype`` packed under ``layout`` (uint8: the
    layout's FP8 source; a float32 scratch or 16-bit pools: kind 0)."""
    lay = layout
    kind = fp8_kind(lay.dtype) if dtype == torch.uint8 else 0
    return scale_table(lay.kv_scales if kind else (), lay.num_layers, device), kind
