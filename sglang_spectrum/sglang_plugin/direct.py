"""Direct writes: a lossless part goes from the prefill's KV pool pages straight into the
decode's (SGLang-free, numpy only).

At budget 1.0 the codec is a gather into the send region and a scatter out of the
receive region: two copies of every byte that the stock backend, writing pool pages
into pool pages, does not make (H200, Mooncake NVLink, 4096 tokens: 1.5 ms of pack and
1.4 ms of unpack alone on the GPU, ~5 and ~8 ms under serving load). When both pools hold the same
bytes per token slot (same dtype, heads and head size, the same layers), the decode
offers its pool (:class:`PoolMemory`, in the ``Grant``) and a lossless part becomes
Mooncake batch writes of the coalesced slot runs of every layer buffer
(:func:`direct_writes`, :func:`write_direct`): no pack, no unpack, no checksum (as the
stock backend).

Not under host staging: Mooncake's TCP transport reads GPU memory 64 KiB at a time
with blocking copies, which the staged path exists to avoid. The decode keeps the
pages of a request whose direct write may still land (see ``ReceiveState.direct``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Mooncake (0.3.x, TCP) fails a batch of more than 2048 writes, and after some such
# failures every later batch of the session fails too: a part goes in batches of at most
# MAX_BATCH_WRITES, and one of more than MAX_DIRECT_WRITES writes (a fragmented pool: a
# run of slots per buffer each) is packed instead, a single write.
MAX_BATCH_WRITES = 1024
MAX_DIRECT_WRITES = 16384


@dataclass(frozen=True)
class PoolMemory:
    """Where one side's KV pool lives: the K buffer of every layer, then every V buffer
    (``ptrs``, each ``[num_slots, heads, head_dim]`` contiguous), and the bytes of one
    token slot in each (``slot_bytes``)."""

    ptrs: tuple[int, ...]
    nbytes: tuple[int, ...]
    slot_bytes: int
    dtype: str

    @classmethod
    def of(cls, k_pools: list[Any], v_pools: list[Any], dtype: str) -> PoolMemory | None:
        """The memory of torch pools, or None when a buffer is not contiguous or the
        buffers' slot sizes differ (no direct writes then)."""
        bufs = [*k_pools, *v_pools]
        if not bufs or not all(b.is_contiguous() for b in bufs):
            return None
        slot = {int(b[0].numel()) * b.element_size() for b in bufs}
        if len(slot) != 1:
            return None
        return cls(
            tuple(int(b.data_ptr()) for b in bufs),
            tuple(int(b.numel()) * b.element_size() for b in bufs),
            slot.pop(),
            dtype,
        )

    def register(self, engine: Any) -> int:
        """Register every buffer with the Mooncake engine (source and target of writes);
        Mooncake's return code (0: registered)."""
        return int(engine.batch_register(list(self.ptrs), list(self.nbytes)))

    def fits(self, ptrs: list[int], slot_bytes: int, dtype: str) -> bool:
        """A peer pool of ``ptrs``/``slot_bytes``/``dtype`` holds the same bytes per slot."""
        return len(ptrs) == len(self.ptrs) and slot_bytes == self.slot_bytes and dtype == self.dtype


def slot_runs(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coalesce slot pairs: ``src[i] -> dst[i]`` (int64 ``[T]`` each) as runs where both
    sides are consecutive. Returns ``(src_start, dst_start, length)``, int64 ``[R]``."""
    src = np.asarray(src, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst, dtype=np.int64).reshape(-1)
    if src.shape != dst.shape:
        raise ValueError(f"{src.size} source slots for {dst.size} destination slots")
    if src.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [src.size]]))
    return src[starts], dst[starts], lengths


def direct_writes(
    src_slots: np.ndarray,
    dst_slots: np.ndarray,
    src: PoolMemory,
    dst_ptrs: list[int],
    max_writes: int = MAX_DIRECT_WRITES,
) -> tuple[list[int], list[int], list[int]] | None:
    """The Mooncake writes of one direct part: ``(source addresses, destination
    addresses, lengths)``, a run of slots of every buffer, buffer by buffer; None when
    they would be more than ``max_writes`` (pack the part instead)."""
    s0, d0, n = slot_runs(src_slots, dst_slots)
    if s0.size * len(src.ptrs) > max_writes:
        return None
    sb = src.slot_bytes
    src_base = np.asarray(src.ptrs, dtype=np.int64)[:, None]
    dst_base = np.asarray(dst_ptrs, dtype=np.int64)[:, None]
    srcs = (src_base + s0[None, :] * sb).reshape(-1)
    dsts = (dst_base + d0[None, :] * sb).reshape(-1)
    lengths = np.broadcast_to(n[None, :] * sb, (len(src.ptrs), n.size)).reshape(-1)
    return srcs.tolist(), dsts.tolist(), lengths.tolist()


def write_direct(
    engine: Any,
    session: str,
    writes: tuple[list[int], list[int], list[int]],
    batch: int = MAX_BATCH_WRITES,
) -> int:
    """Make :func:`direct_writes`'s writes with ``engine`` (SGLang's Mooncake wrapper) into
    ``session``, ``batch`` at a time; Mooncake's return code (negative: a batch failed,
    the rest is not sent)."""
    srcs, dsts, lengths = writes
    for i in range(0, len(srcs), batch):
        j = i + batch
        ret = engine.batch_transfer_sync(session, srcs[i:j], dsts[i:j], lengths[i:j])
        if ret < 0:
            return ret
    return 0
