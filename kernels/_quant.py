"""Quantiser steps shared by the pack kernels (``pack._store_quantized``: per-token
groups; ``channel``: per-channel key blocks), each the float32 step of the torch
reference (``sglang_spectrum.quant``) or an exact shortcut of it.

bf16 pools can be read as int32 words, each a pair of bf16: ``min.bf16x2`` /
``max.bf16x2`` reduce two elements an instruction (exact: bf16 -> float32 is exact),
and the widening of a pair is a shift and a mask (:func:`bf16_pair`). Inline PTX has no
interpreter twin: the callers take a plain path under ``TRITON_INTERPRET``
(:func:`bf16_words` says which).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ._common import interpreted


@triton.jit
def clamp16(x):
    return tl.minimum(tl.maximum(x, -65504.0), 65504.0)


@triton.jit
def plus_zero(w):
    """float16 words ``w`` with -0.0 as +0.0 (``quant.plus_zero``), on the bits: no
    compiler may fold an integer compare the way it could ``x == 0 ? 0 : x``."""
    bits = w.to(tl.int16, bitcast=True)
    return tl.where(bits == -32768, 0, bits).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def group_quantiser(lo_x, hi_x, QMAX: tl.constexpr, EMPTY: tl.constexpr = False):
    """The quantiser of a group (``quant.quantize``'s per-token groups,
    ``quant.quantize_channels``' channels: the same float32 steps) from its raw minimum
    ``lo_x`` and maximum ``hi_x`` (float32, any shape): (clamped minimum, clamped maximum,
    fp16 scale, fp16 minimum, float32 minimum, inverse scale). ``EMPTY``: groups may have
    no element (``lo_x > hi_x``; their codes are never stored), quantised as zeros."""
    lo = clamp16(lo_x)
    hi = clamp16(hi_x)
    if EMPTY:
        lo = tl.where(lo <= hi, lo, 0.0)
        hi = tl.where(lo <= hi, hi, 0.0)
    scale = plus_zero(tl.math.div_rn(hi - lo, tl.full(lo.shape, QMAX, tl.float32)).to(tl.float16))
    mn = plus_zero(lo.to(tl.float16))
    s = scale.to(tl.float32)
    safe = tl.where(s > 0, s, 1.0)  # 1/0 never computed
    inv = tl.where(s > 0, tl.math.div_rn(tl.full(lo.shape, 1.0, tl.float32), safe), 0.0)
    return lo, hi, scale, mn, mn.to(tl.float32), inv


@triton.jit
def clamp_margin(lo_x, hi_x, lo, hi, m, inv, QMAX: tl.constexpr):
    """>= 0 iff no element of a group needs a clamp (raw and clamped extremes, float32
    minimum and inverse scale of :func:`group_quantiser`). The float32 steps are monotone
    in x (``inv >= 0``): when every value is inside +-65504 (the fp16-range clamp is the
    identity) and the extremes quantise to ``0 <= v < qmax + 1``, every element does too
    and ``floor(v)`` is already in range. The sign of a float32 difference is exact; the
    upper bound qmax + 1 - 2**-8 is a float32 number. Groups whose range is tiny against
    their magnitude can miss this (the fp16 rounding of the minimum is then many steps):
    their blocks take the exact clamped path."""
    v_lo = (lo - m) * inv + 0.5
    v_hi = (hi - m) * inv + 0.5
    return tl.minimum(
        tl.minimum(v_lo, (QMAX + 0.99609375) - v_hi), tl.minimum(lo_x + 65504.0, 65504.0 - hi_x)
    )


@triton.jit
def codes(x, m, inv, QMAX: tl.constexpr, CLAMP: tl.constexpr, RZ: tl.constexpr):
    """int32 codes of float32 ``x`` with minimum ``m`` and inverse scale ``inv`` (broadcast
    to ``x``'s shape). ``clamp(floor(v))`` is computed as ``floor(clamp(v))`` (equal for
    every non-NaN v), only with ``CLAMP`` (:func:`clamp_margin` says when it may be left
    out); with ``RZ`` the floor is a round-toward-zero add of 2**23 (a full-rate FADD, not
    FRND + F2I on the quarter-rate conversion pipe), so the code sits in the low bits of
    the int32: the word of the float32 ``2**23 + code``, ``0x4B000000 + code``. Without
    ``RZ`` (the interpreter has no libdevice) the floor is computed and the same bias
    added, so the stores' truncations run on the interpreter as on the GPU."""
    if CLAMP:
        v = (clamp16(x) - m) * inv + 0.5
        v = tl.minimum(tl.maximum(v, 0.0), QMAX)
    else:
        v = (x - m) * inv + 0.5
    if RZ:
        return libdevice.add_rz(v, 8388608.0).to(tl.int32, bitcast=True)  # 2**23 + floor(v)
    else:
        return tl.floor(v).to(tl.int32) + 0x4B000000


@triton.jit
def bf16_pair(w):
    """The two bf16 of int32 words ``w`` as float32 (element 2j is the low half)."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def min_bf16x2(a, b):
    return tl.inline_asm_elementwise(
        "min.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def max_bf16x2(a, b):
    return tl.inline_asm_elementwise(
        "max.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def bf16_words_range(w, AXIS: tl.constexpr, PTX: tl.constexpr):
    """int32 words ``w`` of bf16 pairs as float32 halves and their extremes along
    ``AXIS``: (even, odd, min even, min odd, max even, max odd). ``PTX``: the extremes
    two at a time on the words (``min.bf16x2``); else on the halves (the same numbers)."""
    if PTX:
        lo_e, lo_o = bf16_pair(tl.reduce(w, AXIS, min_bf16x2))
        hi_e, hi_o = bf16_pair(tl.reduce(w, AXIS, max_bf16x2))
        even, odd = bf16_pair(w)
    else:
        even, odd = bf16_pair(w)
        lo_e, lo_o = tl.min(even, AXIS), tl.min(odd, AXIS)
        hi_e, hi_o = tl.max(even, AXIS), tl.max(odd, AXIS)
    return even, odd, lo_e, lo_o, hi_e, hi_o


def bf16_words(dtype: torch.dtype, device: torch.device, kernel) -> bool:
    """Whether ``kernel`` reads pools of ``dtype`` as bf16 words: bf16 pools, and
    ``min.bf16x2`` needs sm_80 (the interpreter emulates it)."""
    if dtype != torch.bfloat16 or interpreted(kernel):
        return dtype == torch.bfloat16
    return _sm80(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _sm80(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)
