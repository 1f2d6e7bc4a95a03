"""Quantiser steps shared by the pack kernels (``pack._quantize``: per-token groups;
``channel``: per-channel key blocks), each the float32 step of the torch reference
(``sglang_spectrum.quant``) or an exact shortcut of it.

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
