"""One-pass Triton twin of :func:`codec.payload_checksum`.

The reference checksum is exact modular arithmetic: ``s1 = sum(w) mod p`` and
``s2 = sum(w * (i mod 65521 + 1)) mod p`` over the little-endian uint32 words
``w`` of the zero-padded payload, ``p = 2**31 - 1``. Any exact evaluation gives
the same two numbers, so this kernel sums 8192-word blocks in int64 (at most
2**13 * 2**32 * 2**16 = 2**61, no overflow) and stores each block's pair modulo ``p``
in its own row: no zero fill, no atomics. Up to :data:`HOST_ROWS` rows (a payload of
up to 2 MiB: a layer group's part) go to the host as they are, which adds them up (one
launch a part); more are summed on the device first (a second launch, next to a read of
over 2 MiB). One read of the payload instead of the reference's int64 temporaries
(about 6 passes over 2x the bytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launch, launch_options

_P = (1 << 31) - 1
_BLOCK = 8192  # words per program; < 65521 so the weight wraps at most once
HOST_ROWS = 64  # block rows the host adds up itself (above: one device sum first)
_LAUNCHES: dict[tuple, Launch] = {}  # by payload words and device


@triton.jit
def _block_sums(words, first, n, sums, row, BLOCK: tl.constexpr):
    """Row ``row`` of ``sums``: ``(s1, s2)`` mod p of words ``first .. first + BLOCK`` below
    ``n`` (``first`` is the index of the block's first word in the whole payload)."""
    idx = first + tl.arange(0, BLOCK)
    w = tl.load(words + idx, mask=idx < n, other=0)
    w = w.to(tl.uint32, bitcast=True).to(tl.int64)  # the word as unsigned
    # (i mod 65521) + 1 of the word's index i
    weight = (first % 65521).to(tl.int32) + tl.arange(0, BLOCK) + 1
    weight = tl.where(weight > 65521, weight - 65521, weight).to(tl.int64)
    # each block's pair modulo p (< 2**31): 2**32 rows add up before an int64 overflows
    tl.store(sums + 2 * row, tl.sum(w, 0) % 2147483647)
    tl.store(sums + 2 * row + 1, tl.sum(w * weight, 0) % 2147483647)


@triton.jit
def _checksum_kernel(words, n_main, n_words, sums, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """Row ``pid`` of ``sums`` (int64 ``[rows, 2]``): block ``pid``'s ``(s1, s2)`` mod p. The
    blocks cover the first ``n_main`` words (a multiple of 16: the loads vectorise); one
    more program, when ``n_words > n_main``, the last ``< TAIL`` words (one launch)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    if start < n_main:
        _block_sums(words, start, n_main, sums, pid, BLOCK)
    else:
        _block_sums(words, n_main.to(tl.int64), n_words, sums, pid, TAIL)


def fast_checksum(payload: torch.Tensor) -> int:
    """Same value as :func:`codec.payload_checksum` (uint8 tensor, any device Triton runs on)."""
    return combine_checksum(checksum_parts(payload).tolist())


def combine_checksum(parts: list[int]) -> int:
    """The 62-bit checksum from the flat ``(s1, s2)`` pairs of :func:`checksum_parts`."""
    s1, s2 = sum(parts[0::2]) % _P, sum(parts[1::2]) % _P
    return (s2 << 31) | s1


def checksum_parts(payload: torch.Tensor) -> torch.Tensor:
    """int64 ``[2n]``: ``n`` pairs ``(s1, s2)`` whose sums are those of
    :func:`codec.payload_checksum` before their last reduction modulo ``2**31 - 1``
    (:func:`combine_checksum` adds them up and reduces), on the payload's device, without
    synchronising (read it with the next host copy you need anyway). ``n`` is the number
    of 8192-word blocks (plus one for a tail of < 16 words) when at most
    :data:`HOST_ROWS` (a payload up to 2 MiB: one launch, no fill), else 1 (a device sum
    after the launch)."""
    flat = payload if payload.dim() == 1 else payload.reshape(-1)
    if flat.numel() % 4 or flat.data_ptr() % 4:
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 4)])
    words = flat.view(torch.int32)
    n_words = words.numel()
    n_main = n_words // 16 * 16  # a multiple of 16 lets the block loads vectorise
    rows = -(-n_main // _BLOCK) + (n_words > n_main)
    if not rows:  # an empty payload
        return torch.zeros(2, dtype=torch.int64, device=flat.device)
    sums = torch.empty(2 * rows, dtype=torch.int64, device=flat.device)  # rows of (s1, s2)
    key = (n_words, flat.device)  # later layer groups of a chunk: payloads of one size
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= 64:
            _LAUNCHES.clear()
        options = dict(BLOCK=_BLOCK, TAIL=16, **launch_options(flat.device))
        launch = _LAUNCHES[key] = Launch(
            _checksum_kernel, (rows,), (None, n_main, n_words, None), options
        )
    launch(words, sums)
    return sums if rows <= HOST_ROWS else sums.view(rows, 2).sum(0)
