"""Transport pieces of the backend: Mooncake engine, registered arenas, metadata rows.

* The Mooncake engine is SGLang's shared wrapper
  (``distributed/device_communicators/mooncake_transfer_engine.py``:
  ``init_mooncake_transfer_engine`` / ``get_mooncake_transfer_engine``,
  ``register``, ``transfer_sync``, ``get_session_id``; same API in 0.5.17 and
  0.5.23). On a machine without RDMA set ``MC_FORCE_TCP=1`` (or
  ``MOONCAKE_PROTOCOL=tcp``).
* :class:`RegisteredArena`: one buffer on the KV pool's device (or pinned host
  memory under ``--spectrum-staging host``), registered with the engine once,
  carved into per-request :class:`Region` s (prefill: packed send buffers and, with
  host staging, their host copies; decode: receive buffers the prefill writes into).
* Metadata ("aux") rows: SGLang's ``MetadataBuffers``, whose pointers and row
  sizes are in ``KVArgs.aux_data_ptrs`` / ``aux_item_lens``: host memory, or
  device memory under ``SGLANG_MOONCAKE_CUSTOM_MEM_POOL=INTRA_NODE_NVLINK``
  (:class:`AuxRows` reads and writes either). The prefill reads its row when
  the last chunk is sent and ships the bytes in its ``Sent`` message; the decode
  writes them into its row before it reports success (no registration of those
  buffers needed).
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

ARENA_ALIGN = 64
MIN_ARENA = 64 << 20
MAX_ARENA = 8 << 30  # of the auto share; an arena grows past it to hold the longest request
MAX_PARTS = 64  # receive room for at most this many parts (the prefill merges beyond)


def mooncake_engine(hostname: str, gpu_id: int, ib_device: str | None) -> Any:
    """SGLang's shared Mooncake engine of this process (created on first use)."""
    from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
        get_mooncake_transfer_engine,
        init_mooncake_transfer_engine,
    )

    engine = get_mooncake_transfer_engine()
    if engine is None:
        engine = init_mooncake_transfer_engine(
            hostname=hostname, gpu_id=gpu_id, ib_device=ib_device
        )
    return engine


class RegisteredArena:
    """One registered buffer carved into per-request regions (first fit, coalescing
    free list, thread-safe). Regions are released exactly once (:class:`Region`)."""

    def __init__(
        self,
        nbytes: int,
        device: torch.device,
        engine: Any,
        name: str,
        buf: torch.Tensor | None = None,
    ):
        self.name = name
        self.size = int(nbytes)
        if buf is not None and buf.numel() >= self.size and buf.device == device:
            self.buf = buf[: self.size]  # memory reserved before SGLang sized its KV pool
        else:
            self.buf = transfer_buffer(self.size, device)
        self.base = int(self.buf.data_ptr())
        self.engine = engine
        if engine is not None:
            engine.register(self.base, self.size)
        self._free: list[tuple[int, int]] = [(0, self.size)]
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self.in_use = 0

    def alloc(self, nbytes: int) -> Region | None:
        """A region of at least ``nbytes`` (64-byte aligned), or None when full."""
        need = max(ARENA_ALIGN, -(-int(nbytes) // ARENA_ALIGN) * ARENA_ALIGN)
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                if length >= need:
                    if length == need:
                        del self._free[i]
                    else:
                        self._free[i] = (off + need, length - need)
                    self.in_use += need
                    return Region(self, off, need)
        return None

    def alloc_wait(self, nbytes: int, timeout_s: float, cancelled=None) -> Region | None:
        """:meth:`alloc`, waiting up to ``timeout_s`` for regions to be released (None
        after that, or as soon as ``cancelled()`` is true)."""
        deadline = time.monotonic() + timeout_s
        while True:
            region = self.alloc(nbytes)
            if region is not None:
                return region
            left = deadline - time.monotonic()
            if left <= 0 or (cancelled is not None and cancelled()):
                return None
            with self._freed:
                self._freed.wait(min(left, 0.05))

    def _release(self, off: int, length: int) -> None:
        with self._lock:
            self.in_use -= length
            self._free.append((off, length))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for o, n in self._free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((o, n))
            self._free = merged
            self._freed.notify_all()

    def close(self) -> None:
        if self.engine is not None:
            try:
                self.engine.deregister(self.base)
            except Exception:
                pass
            self.engine = None


@dataclass(eq=False)
class Region:
    """A piece of an arena, or a one-off registered buffer; ``release()`` is idempotent."""

    arena: RegisteredArena | None
    offset: int
    capacity: int
    own: torch.Tensor | None = None  # one-off buffer (prefill, arena full)
    engine: Any = None
    _released: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ptr(self) -> int:
        if self.own is not None:
            return int(self.own.data_ptr())
        return self.arena.base + self.offset

    def view(self, nbytes: int | None = None) -> torch.Tensor:
        """uint8 ``[nbytes]`` view of the region (default: all of it)."""
        n = self.capacity if nbytes is None else int(nbytes)
        if self.own is not None:
            return self.own[:n]
        return self.arena.buf[self.offset : self.offset + n]

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        if self.own is not None:
            if self.engine is not None:
                self.engine.deregister(int(self.own.data_ptr()))
            self.own = None
        elif self.arena is not None:
            self.arena._release(self.offset, self.capacity)

    @staticmethod
    def one_off(nbytes: int, device: torch.device, engine: Any) -> Region:
        """A buffer registered for one request (when the arena is full)."""
        buf = transfer_buffer(max(int(nbytes), ARENA_ALIGN), device)
        engine.register(int(buf.data_ptr()), buf.numel())
        return Region(None, 0, buf.numel(), own=buf, engine=engine)


def transfer_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """uint8 ``[nbytes]`` on ``device``; host memory is pinned when CUDA is present (so
    copies to and from the GPU are single asynchronous DMA transfers)."""
    device = torch.device(device)
    pin = device.type == "cpu" and torch.cuda.is_available()
    return torch.empty(int(nbytes), dtype=torch.uint8, device=device, pin_memory=pin)


def pool_nbytes(k_pools: list[torch.Tensor], v_pools: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in [*k_pools, *v_pools])


_RESERVED: dict[str, torch.Tensor] = {}


def joint_arena_bytes(kv_memory: int, budget: float, largest: int = 0) -> int:
    """Arena bytes out of ``kv_memory``, the bytes SGLang is about to give the KV
    pool, so that pool ``P`` and arena ``A`` share it by the auto rule of
    :func:`arena_bytes` (``A = P * b / 4``): ``A = kv_memory * b / (4 + b)``,
    clamped to 64 MiB .. 8 GiB; at least ``largest`` (the longest request's region)
    while that leaves the pool half of ``kv_memory``."""
    b = min(float(budget), 1.0)
    share = int(min(max(kv_memory * b / (4.0 + b), MIN_ARENA), MAX_ARENA))
    return max(share, min(int(largest), int(kv_memory) // 2))


def reserve_arena_memory(nbytes: int, device: torch.device) -> torch.Tensor:
    """Allocate the arena's memory now (before SGLang profiles the memory left for its
    KV pool, so the pool is sized without it); :func:`take_reserved` hands it over."""
    buf = torch.empty(int(nbytes), dtype=torch.uint8, device=device)
    _RESERVED[str(device)] = buf
    return buf


def take_reserved(device: torch.device) -> torch.Tensor | None:
    return _RESERVED.pop(str(device), None)


def arena_bytes(arena_mb: float, pool_bytes: int, budget: float, largest: int = 0) -> int:
    """Arena size: ``--spectrum-arena-mb``, or auto = a quarter of the KV pool's packed
    size at the budget (room for the packed KV of a quarter of the pool in flight),
    clamped to 64 MiB .. 8 GiB, and at least ``largest`` (the region of the longest
    request the server admits, whatever its size)."""
    if arena_mb:
        return int(arena_mb * (1 << 20))
    share = min(max(pool_bytes * min(budget, 1.0) / 4, MIN_ARENA), MAX_ARENA)
    return int(max(share, largest))


def longest_receive_region(
    layout: dict[str, Any], num_tokens: int, config: Any, chunk_tokens: int = 0
) -> int:
    """The largest :func:`region_bytes` a decode of ``layout`` may grant for
    ``num_tokens`` tokens: from a prefill of its own dtype or, for an FP8 pool, also
    from a 16-bit one (an asymmetric pair: budgets count 16-bit bytes either way, but
    a 16-bit source's headers are larger)."""
    from sglang_spectrum.fp8 import is_fp8

    sources = [layout["dtype"]] + (["bfloat16"] if is_fp8(layout["dtype"]) else [])
    return max(region_bytes(layout, num_tokens, config, chunk_tokens, d) for d in sources)


def region_bytes(
    layout: dict[str, Any],
    num_tokens: int,
    config: Any,
    chunk_tokens: int = 0,
    dtype: str | None = None,
    *,
    layers: int | None = None,
    groups: int = 1,
) -> int:
    """Bytes of a send/receive region for ``num_tokens`` tokens of the KV ``layout``
    (:func:`.manager.pool_layout`'s keys) packed under ``config``
    (:func:`~sglang_spectrum.sizes.packed_size_bound`) from pools of ``dtype`` (default
    the layout's; the decode passes the prefill's), with room for one part per prefill
    chunk of ``chunk_tokens`` (0: one part); chunk ends need not fall on the
    receiver's tokens (one part more) and a cached prefix may go ahead (one more), at
    most :data:`MAX_PARTS`; times ``groups`` when each part is sent as that many layer
    groups (``--spectrum-layer-group``). ``layers``: the bound of that many of the
    layout's layers (one layer group's part), default all of them."""
    from sglang_spectrum.sizes import packed_size_bound

    parts = min(2 + -(-num_tokens // chunk_tokens), MAX_PARTS) if chunk_tokens > 0 else 1
    return packed_size_bound(
        num_tokens,
        int(layers) if layers else layout["layers"],
        layout["kv_heads"],
        layout["head_dim"],
        dtype or layout["dtype"],
        config,
        parts=parts * max(int(groups), 1),
    )


class _DeviceBytes:
    """``__cuda_array_interface__`` of ``n`` bytes of device memory at ``ptr``."""

    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {
            "shape": (n,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }


class AuxRows:
    """Rows of SGLang's metadata buffers by pointer: host memory (ctypes) or, with
    ``device`` a CUDA device, device memory (a zero-copy tensor view per row)."""

    def __init__(self, ptrs: list[int], item_lens: list[int], device: torch.device | None = None):
        self.ptrs = [int(p) for p in ptrs]
        self.item_lens = [int(n) for n in item_lens]
        self.device = device if device is not None and device.type == "cuda" else None
        self._stream: Any = None  # device rows: copies on a stream of their own (see write)

    def _view(self, ptr: int, n: int) -> torch.Tensor:
        return torch.as_tensor(_DeviceBytes(ptr, n), device=self.device)

    def read(self, index: int) -> list[bytes]:
        """The bytes of row ``index`` of each metadata buffer."""
        if self.device is None:
            return [ctypes.string_at(p + index * n, n) for p, n in zip(self.ptrs, self.item_lens)]
        return [
            self._view(p + index * n, n).cpu().numpy().tobytes()
            for p, n in zip(self.ptrs, self.item_lens)
        ]

    def write(self, index: int, rows: list[bytes]) -> None:
        """Write row ``index`` of each metadata buffer; refuses rows of another size."""
        if len(rows) != len(self.ptrs):
            raise ValueError(f"{len(rows)} metadata rows for {len(self.ptrs)} metadata buffers")
        for n, row in zip(self.item_lens, rows):
            if len(row) != n:
                raise ValueError(f"metadata row of {len(row)} bytes, the buffer's rows have {n}")
        if self.device is None:
            for p, n, row in zip(self.ptrs, self.item_lens, rows):
                ctypes.memmove(p + index * n, row, n)
            return
        # Not the caller's current stream: on the control thread that is the legacy
        # default stream, whose copies wait for the scheduler's queued forward (H200,
        # NVLink, 4k C=4: a decode step, ~40 ms, before every request's Success).
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            for p, n, row in zip(self.ptrs, self.item_lens, rows):
                src = torch.frombuffer(bytearray(row), dtype=torch.uint8)
                self._view(p + index * n, n).copy_(src)
        self._stream.synchronize()
