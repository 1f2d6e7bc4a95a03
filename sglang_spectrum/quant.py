"""The quantisers of the INT8/INT4 tiers (part of the codec, :mod:`.codec`): asymmetric
per-group and per-channel (KIVI) quantisation, their inverses, the Hadamard rotation.
The arithmetic is the wire format's (see :mod:`.wire`); the Triton kernels repeat it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .config import SpectrumConfigError

_FP16_MAX = 65504.0


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
    # qmax as a tensor on xg's device: CUDA torch divides by a Python (CPU) scalar as a
    # multiply by its float32 reciprocal, one bit off the format's rounded division in
    # some groups (the scale word then 1 fp16 ulp off the kernels' and the CPU's)
    qmax_t = torch.full((), qmax, dtype=xg.dtype, device=xg.device)
    scale = plus_zero(((xg.amax(-1) - lo) / qmax_t).to(torch.float16))
    minimum = plus_zero(lo.to(torch.float16))
    s, m = scale.float(), minimum.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = torch.floor((xg - m[..., None]) * inv[..., None] + 0.5).clamp_(0, qmax).to(torch.uint8)
    return q, torch.stack([scale, minimum], dim=-1)


def plus_zero(words: torch.Tensor) -> torch.Tensor:
    """float16 scale or minimum words with -0.0 stored as +0.0: which zero a min/max
    returns among +0.0 and -0.0 is up to the implementation (torch CPU or CUDA, Triton's
    reductions, ``min.bf16x2``), so the format fixes it (decoding is unchanged:
    ``q * scale + -0.0`` and ``+ 0.0`` are equal)."""
    return words.masked_fill(words == 0, 0.0)


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
