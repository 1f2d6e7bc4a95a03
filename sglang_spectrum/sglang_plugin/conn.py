"""The ``spectrum`` PD transfer backend: SGLang KV manager/sender/receiver/bootstrap classes.

The classes subclass SGLang's Mooncake backend (``disaggregation/mooncake/conn.py``)
and keep its bootstrap, aux-data, status and failure machinery. What differs:

**Packed KV path** (DESIGN.md §7). Prefill: :meth:`SpectrumKVSender.send` holds
the page indices of every chunk (pages of earlier chunks stay allocated and
locked by SGLang until the transfer ends); at the last chunk it gathers the
request's K/V from the pool (``k_buffer[l][slots]``, slots =
``req_to_token[req_pool_idx, :prompt_len]``), packs it with the codec
(``allow_drop=False``, key-norm scoring: the pool has no queries), copies the
bytes into a send arena registered with Mooncake and enqueues ONE transfer
chunk. The transfer worker (upstream's, via :meth:`SpectrumKVManager.send_kvcache`)
writes the blob with one Mooncake write into the receive region the decode
reserved for that request, tells the decode its size and checksum
(``SPECTRUM_SENT``), then upstream sends the aux row and syncs the status.
Decode: :meth:`SpectrumKVReceiver.send_metadata` reserves a region in a
registered receive arena (capacity from the prompt length and the prefill's
budget) and advertises it with the room message; when the arena is full the
room message is deferred (back-pressure) until a region frees. On ``Success``,
:meth:`SpectrumKVReceiver.poll` validates and unpacks the blob into the
request's preallocated slots *before* the request can join the decode batch;
a codec error fails that request (SGLang frees its slots, the client gets the
message).

**Bootstrap checks**: both sides exchange a *wire identity* (codec format
version, plugin protocol, KV layout: layers, KV heads, head_dim, dtype, page
size; attention-TP size; the prefill's budget and resolved tier mode). Prefill
ranks register it at the bootstrap server (``PUT /spectrum/register``), decode
reads ``GET /spectrum/info`` and refuses a prefill that differs; decode appends
its identity to every ZMQ message it sends to prefill (two trailing frames
``[b"SPECTRUM", json]``) and prefill refuses a decode that differs or sends none.

Test-only switches (environment of the prefill server): ``SGLANG_SPECTRUM_FAULT``
(see :func:`fault_for`) and ``SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import requests
import torch
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.mooncake.conn import (
    MooncakeKVBootstrapServer,
    MooncakeKVManager,
    MooncakeKVReceiver,
    MooncakeKVSender,
    TransferKVChunk,
)
from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType
from sglang.srt.utils.network import NetworkAddress

from . import BACKEND_NAME, PROTOCOL_VERSION
from .metrics import get_metrics, write_stats
from .options import SpectrumServerOptions, check_no_drop, options_from_server_args

logger = logging.getLogger(__name__)

TRAILER_TAG = b"SPECTRUM"  # decode -> prefill: [..., TRAILER_TAG, json identity]
GRANT_TAG = b"SPECTRUM_GRANT"  # decode -> prefill room message: [..., GRANT_TAG, json, TRAILER]
REJECT_HEADER = b"SPECTRUM_REJECT"  # decode -> prefill: [hdr, room, reason]
FAIL_HEADER = b"SPECTRUM_FAIL"  # prefill -> decode: [hdr, room, reason]
SENT_HEADER = b"SPECTRUM_SENT"  # prefill -> decode: [hdr, room, json (size, checksum, stats)]
# Testing only: pretend another codec format version (to exercise the refusal).
TEST_VERSION_ENV = "SGLANG_SPECTRUM_TEST_FORMAT_VERSION"
# Testing only: damage packed buffers (see fault_for).
FAULT_ENV = "SGLANG_SPECTRUM_FAULT"
FAULT_MODES = ("corrupt", "header", "truncate", "stale")
# Testing only: sleep this long before the write of rids with "spectrum-delay" (kill tests).
TEST_DELAY_ENV = "SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S"
ARENA_ALIGN = 64
# How long decode waits for SPECTRUM_SENT after the Success status (both go
# over the same ZMQ PUSH socket, in that order, so this is only a safety net).
SENT_INFO_TIMEOUT_S = 30.0


def format_version() -> int:
    from sglang_spectrum.codec import FORMAT_VERSION

    override = os.environ.get(TEST_VERSION_ENV)
    return int(override) if override else int(FORMAT_VERSION)


def wire_identity(opts: SpectrumServerOptions | None = None) -> dict[str, Any]:
    """What a SpectrumKV server tells its peers about itself."""
    import sglang_spectrum

    ident: dict[str, Any] = {
        "backend": BACKEND_NAME,
        "format_version": format_version(),
        "protocol": PROTOCOL_VERSION,
        "plugin_version": getattr(sglang_spectrum, "__version__", "?"),
    }
    if opts is not None:
        ident["options"] = opts.to_dict()
    return ident


def _layout_desc(layout: dict[str, Any]) -> str:
    return ", ".join(f"{k}={layout.get(k)}" for k in LAYOUT_KEYS)


LAYOUT_KEYS = ("layers", "kv_heads", "head_dim", "dtype", "page_size")


def incompatibility(
    peer: dict[str, Any] | None,
    peer_desc: str,
    local_role: str,
    local: dict[str, Any] | None = None,
) -> str:
    """'' if ``peer`` speaks our wire format (and, given ``local``, our KV layout), else why not."""
    if not peer or peer.get("backend") != BACKEND_NAME:
        return (
            f"{peer_desc} is not a SpectrumKV server (it must run"
            f" --disaggregation-transfer-backend {BACKEND_NAME}); refusing the transfer"
        )
    mine = format_version()
    if peer.get("format_version") != mine or peer.get("protocol") != PROTOCOL_VERSION:
        return (
            f"SpectrumKV format version mismatch: {peer_desc} speaks"
            f" v{peer.get('format_version')} (protocol {peer.get('protocol')}), this"
            f" {local_role} server speaks v{mine} (protocol {PROTOCOL_VERSION}); run the"
            f" same sglang-spectrum version on prefill and decode"
        )
    if local is None:
        return ""
    p_tp, l_tp = peer.get("attn_tp_size"), local.get("attn_tp_size")
    if p_tp is not None and l_tp is not None and p_tp != l_tp:
        return (
            f"SpectrumKV needs the same attention-TP size on prefill and decode (KV heads are"
            f" packed per rank): {peer_desc} has attn_tp_size={p_tp}, this {local_role}"
            f" server has {l_tp}; use the same --tp-size (and DP-attention setting) on both"
        )
    p_lay, l_lay = peer.get("layout"), local.get("layout")
    if p_lay and l_lay and any(p_lay.get(k) != l_lay.get(k) for k in LAYOUT_KEYS):
        return (
            f"SpectrumKV KV layout mismatch: {peer_desc} has {_layout_desc(p_lay)}, this"
            f" {local_role} server has {_layout_desc(l_lay)}; serve the same model with the"
            f" same --kv-cache-dtype and --page-size on prefill and decode"
        )
    tiers = peer.get("tiers_resolved")
    if tiers is not None and tiers not in ("3", "2"):
        return f"SpectrumKV: {peer_desc} packs with an unknown tier mode {tiers!r}"
    return ""


def split_trailer(msg: list[bytes]) -> tuple[list[bytes], dict[str, Any] | None]:
    """Remove our trailing ``[TRAILER_TAG, json]`` frames; returns (frames, identity)."""
    if len(msg) >= 2 and msg[-2] == TRAILER_TAG:
        try:
            return msg[:-2], json.loads(msg[-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return msg[:-2], {}
    return msg, None


def split_grant(msg: list[bytes]) -> tuple[list[bytes], dict[str, Any] | None]:
    """Remove a trailing ``[GRANT_TAG, json]`` pair; returns (frames, grant)."""
    if len(msg) >= 2 and msg[-2] == GRANT_TAG:
        try:
            return msg[:-2], json.loads(msg[-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return msg[:-2], None
    return msg, None


def fault_for(rid: str | None, counter: list[int]) -> str | None:
    """Test-only fault injection on the prefill side (``SGLANG_SPECTRUM_FAULT``).

    * ``corrupt`` | ``header`` | ``truncate`` | ``stale``: the *first* packed
      request of this server gets that fault (one byte of the payload flipped
      -> payload checksum mismatch; one byte of the header flipped -> header
      checksum mismatch; only half of the blob written -> truncated buffer;
      the blob announced with another checksum -> stale/foreign blob), every
      other request is untouched;
    * ``rid``: a request whose rid contains ``spectrum-fault-<mode>`` gets
      ``<mode>`` (several faults on one deployment, independent of order).
    """
    spec = os.environ.get(FAULT_ENV, "").strip().lower()
    if not spec:
        return None
    if spec == "rid":
        for mode in FAULT_MODES:
            if rid and f"spectrum-fault-{mode}" in rid:
                return mode
        return None
    if spec in FAULT_MODES:
        counter[0] += 1
        return spec if counter[0] == 1 else None
    return None


def test_delay_s(rid: str | None) -> float:
    """Test-only: seconds to wait before the Mooncake write of a request whose rid
    contains ``spectrum-delay`` (``SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S``), so a
    test can kill the decode server while that transfer is in flight."""
    try:
        delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    except ValueError:
        return 0.0
    return delay if delay > 0 and rid and "spectrum-delay" in rid else 0.0


# --------------------------------------------------------------------------- arenas


class RegisteredArena:
    """One buffer registered with the Mooncake engine, carved into per-request regions.

    First-fit allocation with coalescing free list; thread-safe. Regions are
    released exactly once (:class:`Region`).
    """

    def __init__(self, nbytes: int, device: Any, engine: Any, name: str):
        self.name = name
        self.size = int(nbytes)
        self.buf = torch.empty(self.size, dtype=torch.uint8, device=device)
        self.base = int(self.buf.data_ptr())
        self.engine = engine
        ret = engine.register(self.base, self.size) if engine is not None else 0
        if ret not in (0, None):
            raise RuntimeError(f"Mooncake could not register the {name} arena ({ret})")
        self._free: list[tuple[int, int]] = [(0, self.size)]
        self._lock = threading.Lock()
        self.in_use = 0

    def alloc(self, nbytes: int) -> Region | None:
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


@dataclass(eq=False)
class Region:
    """A piece of an arena (or a one-off registered buffer); release() is idempotent."""

    arena: RegisteredArena | None
    offset: int
    capacity: int
    own: torch.Tensor | None = None  # one-off buffer (prefill fallback)
    engine: Any = None
    _released: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ptr(self) -> int:
        if self.own is not None:
            return int(self.own.data_ptr())
        return self.arena.base + self.offset

    def view(self, nbytes: int | None = None) -> torch.Tensor:
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
    def one_off(nbytes: int, device: Any, engine: Any) -> Region:
        buf = torch.empty(max(int(nbytes), ARENA_ALIGN), dtype=torch.uint8, device=device)
        engine.register(int(buf.data_ptr()), buf.numel())
        return Region(None, 0, buf.numel(), own=buf, engine=engine)


def arena_bytes(opts: SpectrumServerOptions, kv_pool: Any) -> int:
    """Arena size: ``--spectrum-arena-mb``, or auto = a quarter of the KV pool, 64 MiB..1 GiB."""
    if opts.arena_mb:
        return int(opts.arena_mb * (1 << 20))
    try:
        pool = sum(t.numel() * t.element_size() for t in kv_pool.k_buffer)
        pool += sum(t.numel() * t.element_size() for t in kv_pool.v_buffer)
    except Exception:
        pool = 256 << 20
    return int(min(max(pool // 4, 64 << 20), 1 << 30))


def expand_pages(pages: npt.NDArray[Any], page_size: int) -> npt.NDArray[np.int64]:
    """Page indices -> token slots (page * page_size + offset)."""
    pages = np.asarray(pages, dtype=np.int64).reshape(-1)
    if page_size == 1:
        return pages
    return (pages[:, None] * page_size + np.arange(page_size, dtype=np.int64)[None, :]).reshape(-1)


def pool_layout(kv_pool: Any) -> dict[str, Any]:
    """The KV layout of an MHA token-to-KV pool, as exchanged at bootstrap."""
    k0 = kv_pool.k_buffer[0]
    return {
        "layers": len(kv_pool.k_buffer),
        "kv_heads": int(k0.shape[1]),
        "head_dim": int(k0.shape[2]),
        "dtype": str(k0.dtype).removeprefix("torch."),
        "page_size": int(getattr(kv_pool, "page_size", 1)),
    }


def receive_capacity(
    layout: dict[str, Any],
    num_tokens: int,
    budget: float,
    group_size: int | None = None,
    key_scales: str = "token",
) -> int:
    """Upper bound of the packed size of ``num_tokens`` tokens at ``budget`` (allow_drop=False)
    with the prefill's quantisation ``group_size`` (None = head_dim) and ``key_scales``.

    Uses the 2-tier floor (every non-sink token at INT8), which is at least the
    3-tier one, so it holds whatever tier mode the prefill resolved.
    """
    from sglang_spectrum.codec import config_layout, fixed_overhead, token_budget
    from sglang_spectrum.config import SpectrumConfig

    cfg = SpectrumConfig(
        budget=min(max(budget, 1e-6), 1.0),
        tiers="2",
        group_size=group_size,
        key_scales=key_scales,
        allow_drop=False,
    )
    lay = config_layout(
        cfg,
        layout["layers"],
        layout["kv_heads"],
        layout["head_dim"],
        layout["dtype"],
        max(int(num_tokens), 1),
    )
    return int(token_budget(lay, cfg) + fixed_overhead(lay))


# --------------------------------------------------------------------------- sockets


class _InterceptingSocket:
    """Wraps the manager's ZMQ PULL socket read by SGLang's bootstrap/decode thread.

    ``on_message`` returns the (possibly rewritten) message for SGLang, or None
    when it consumed it. Everything else is delegated to the real socket.
    """

    def __init__(self, sock: Any, on_message: Callable[[list[bytes]], list[bytes] | None]):
        self._sock = sock
        self._on_message = on_message

    def recv_multipart(self, *args: Any, **kwargs: Any) -> list[bytes]:
        while True:
            msg = self._sock.recv_multipart(*args, **kwargs)
            try:
                out = self._on_message(msg)
            except Exception:  # never kill SGLang's thread because of us
                logger.exception("spectrum: failed to inspect a ZMQ message; passing it on")
                out = msg
            if out is not None:
                return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _TrailerSocket:
    """Wraps a PUSH socket to prefill: appends our frames to every message."""

    def __init__(self, sock: Any, trailer: list[bytes]):
        self._sock = sock
        self._trailer = trailer

    def send_multipart(self, frames: list[bytes], *args: Any, **kwargs: Any) -> Any:
        return self._sock.send_multipart(list(frames) + self._trailer, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@dataclass
class SpectrumTransferChunk(TransferKVChunk):
    """The one transfer chunk of a packed request (all its pages), with the blob."""

    region: Region | None = None
    nbytes: int = 0  # bytes to write (less than the blob for the 'truncate' fault)
    checksum: int = 0  # payload checksum announced to decode
    stats: dict[str, Any] = field(default_factory=dict)


class _ChunkTrackingQueue:
    """Queue wrapper: remembers, per transfer thread, the chunk being processed."""

    def __init__(self, queue: Any, tls: threading.local):
        self._queue = queue
        self._tls = tls

    def get(self, *args: Any, **kwargs: Any) -> Any:
        chunk = self._queue.get(*args, **kwargs)
        self._tls.chunk = chunk
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


# --------------------------------------------------------------------------- manager


class SpectrumKVManager(MooncakeKVManager):
    """Mooncake manager + packed transfers + wire-identity checks."""

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: DisaggregationMode,
        server_args: Any,
        is_mla_backend: bool | None = False,
    ):
        # Set before super().__init__: it registers to bootstrap and starts threads.
        self.spectrum_options = options_from_server_args(server_args)
        self.identity = wire_identity(self.spectrum_options)
        self.identity_frames = [TRAILER_TAG, json.dumps(self.identity).encode("utf-8")]
        self.kv_pool: Any = None
        self.scheduler: Any = None
        self.layout: dict[str, Any] | None = None
        self.arena: RegisteredArena | None = None
        self.metrics: Any = None
        self._peer_lock = threading.Lock()
        self._decode_sessions: dict[str, str] = {}  # prefill: session -> '' ok | reason
        self._failed_rooms: set[int] = set()  # prefill: rooms we refused (Failed is sticky)
        self._grants: dict[int, dict[str, dict[str, Any]]] = {}  # prefill: room -> session -> grant
        self._prefill_verdicts: dict[str, str] = {}  # decode: bootstrap addr -> '' | reason
        self._prefill_is_spectrum: dict[str, bool] = {}
        self._prefill_peers: dict[str, dict[str, Any]] = {}  # decode: addr -> prefill identity
        self._pinned_failures: dict[int, str] = {}  # decode: reasons sent by prefill
        self._sent_info: dict[int, dict[str, Any]] = {}  # decode: room -> SPECTRUM_SENT
        self._tls = threading.local()
        self._fault_counter = [0]
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        logger.info(
            "SpectrumKV %s manager ready: %s",
            disaggregation_mode.value,
            json.dumps(self.identity, sort_keys=True),
        )

    # ------------------------------------------------------------------ setup

    def init_engine(self) -> None:
        from sglang.srt.disaggregation.mooncake.conn import get_mooncake_transfer_engine

        engine = get_mooncake_transfer_engine()
        if engine is None:
            from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
                init_mooncake_transfer_engine,
            )

            engine = init_mooncake_transfer_engine(
                hostname=self.local_ip,
                gpu_id=self.kv_args.gpu_id,
                ib_device=(
                    self.server_args.disaggregation_ib_device
                    or getattr(self.server_args, "mooncake_ib_device", None)
                ),
            )
        self.engine = engine

    @property
    def is_prefill(self) -> bool:
        return self.disaggregation_mode == DisaggregationMode.PREFILL

    def attach_kv_pool(self, kv_pool: Any, scheduler: Any) -> None:
        """Called by the scheduler-startup hook with the token-to-KV pool (before :meth:`ready`)."""
        self.kv_pool = kv_pool
        self.scheduler = scheduler
        problem = self._unsupported(kv_pool)
        if problem:
            raise RuntimeError(f"SpectrumKV cannot serve this model: {problem}")
        self.layout = pool_layout(kv_pool)
        logger.info(
            "SpectrumKV: KV pool attached (%s, layers=%s, kv_heads=%s, head_dim=%s,"
            " dtype=%s, page_size=%s)",
            type(kv_pool).__name__,
            self.layout["layers"],
            self.layout["kv_heads"],
            self.layout["head_dim"],
            self.layout["dtype"],
            self.layout["page_size"],
        )

    def _unsupported(self, kv_pool: Any) -> str:
        if self.is_mla_backend:
            return "MLA KV pools are not supported (MHA pools only)"
        if not (hasattr(kv_pool, "k_buffer") and hasattr(kv_pool, "v_buffer")):
            return f"{type(kv_pool).__name__} has no k_buffer/v_buffer (MHA pools only)"
        name = type(kv_pool).__name__
        if "SWA" in name or "Hybrid" in name or "NSA" in name:
            return f"{name}: hybrid (sliding-window / mamba / NSA) pools are not supported"
        dt = kv_pool.k_buffer[0].dtype
        if dt not in (torch.float16, torch.bfloat16, torch.float32):
            return f"KV cache dtype {dt} is not supported (16/32-bit float pools only)"
        if self.pp_size != 1:
            return "pipeline parallelism is not supported"
        if getattr(self, "enable_all_cp_ranks_for_transfer", False):
            return "SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER is not supported"
        if getattr(self.server_args, "enable_hisparse", False):
            return "--enable-hisparse is not supported"
        return ""

    def ready(self) -> None:
        """After attach (and the prefill's startup probe): checks, arena, announce ourselves."""
        from .probe_hook import resolved_tiers

        opts = self.spectrum_options
        tiers = resolved_tiers(opts.tiers)
        if self.is_prefill:
            check_no_drop(opts, self.layout["head_dim"] if self.layout else None)
            if opts.tiers == "auto":
                from .options import no_drop_floor

                floor = no_drop_floor(
                    tiers, self.layout["head_dim"], opts.group_size, opts.key_scales
                )
                if opts.budget < floor:
                    logger.warning(
                        "SpectrumKV: the probe chose %s tiers; --spectrum-budget %g is below"
                        " their no-drop floor %.3f, long prompts will be sent at that floor",
                        tiers,
                        opts.budget,
                        floor,
                    )
        self.identity = dict(
            wire_identity(opts),
            layout=self.layout,
            attn_tp_size=self.attn_tp_size,
            role="prefill" if self.is_prefill else "decode",
        )
        if self.is_prefill:
            self.identity["tiers_resolved"] = tiers
        self.identity_frames = [TRAILER_TAG, json.dumps(self.identity).encode("utf-8")]
        if self.kv_pool is not None:
            device = self.kv_pool.k_buffer[0].device
            size = arena_bytes(opts, self.kv_pool)
            role = "send" if self.is_prefill else "receive"
            self.arena = RegisteredArena(size, device, self.engine, role)
            logger.info("SpectrumKV: %s arena of %.1f MiB registered", role, size / (1 << 20))
        role = "prefill" if self.is_prefill else "decode"
        self.metrics = get_metrics(self.server_args, role)
        if self.metrics is not None and self.is_prefill:
            self.metrics.set_mode(tiers, opts.budget)
        if self.is_prefill:
            self._register_spectrum_rank()

    def _bootstrap_base_url(self) -> str:
        # same host choice as CommonKVManager.register_to_bootstrap (common/conn.py:330-337)
        if self.dist_init_addr:
            host = NetworkAddress.parse(self.dist_init_addr).resolved().host
        else:
            host = self.bootstrap_host
        return NetworkAddress(host, self.bootstrap_port).to_url()

    def _register_spectrum_rank(self) -> None:
        payload = dict(
            self.identity,
            attn_dp_rank=self.attn_dp_rank,
            attn_cp_rank=self.attn_cp_rank,
            attn_tp_rank=self.attn_tp_rank,
            pp_rank=self.pp_rank,
            system_dp_rank=self.system_dp_rank,
        )
        try:
            r = requests.put(
                f"{self._bootstrap_base_url()}/spectrum/register", json=payload, timeout=5
            )
            if r.status_code != 200:
                logger.error("SpectrumKV registration refused: %s %s", r.status_code, r.text)
        except Exception as e:
            logger.error("SpectrumKV failed to register to the bootstrap server: %s", e)

    def start_prefill_thread(self) -> None:
        self.server_socket = _InterceptingSocket(self.server_socket, self._on_prefill_message)
        super().start_prefill_thread()

    def start_decode_thread(self) -> None:
        self.server_socket = _InterceptingSocket(self.server_socket, self._on_decode_message)
        super().start_decode_thread()

    # ------------------------------------------------------------------ status

    def update_status(self, bootstrap_room: int, status: int) -> None:
        if bootstrap_room in self._failed_rooms:
            status = KVPoll.Failed  # a refused room must not be revived by a later event
        super().update_status(bootstrap_room, status)

    def record_failure(self, bootstrap_room: int, failure_reason: str) -> None:
        # keep the precise reason a SpectrumKV prefill sent over a generic one
        super().record_failure(
            bootstrap_room, self._pinned_failures.get(bootstrap_room, failure_reason)
        )

    def _prefill_unique_rank(self) -> int:
        # as in MooncakeKVManager.transfer_worker (mooncake/conn.py:1171-1175)
        return (
            self.attn_tp_rank * (self.pp_size * self.attn_cp_size)
            + self.pp_rank * self.attn_cp_size
            + self.attn_cp_rank
        )

    # ------------------------------------------------------------------ prefill side

    def _on_prefill_message(self, msg: list[bytes]) -> list[bytes] | None:
        frames, peer = split_trailer(msg)
        frames, grant = split_grant(frames)
        if frames and frames[0] == REJECT_HEADER:
            room, reason = int(frames[1].decode("ascii")), frames[2].decode("utf-8")
            logger.error("SpectrumKV: decode refused room %s: %s", room, reason)
            self._fail_room(room, f"decode server refused the transfer: {reason}")
            return None
        if len(frames) < 4:
            return frames
        room = frames[0].decode("ascii", "replace")
        if room in ("WATERMARK", "STAGING_RSP"):
            return frames
        session = frames[3].decode("ascii", "replace")
        endpoint = frames[1].decode("ascii", "replace")
        peer_desc = f"decode at {endpoint} (session {session})"
        if room == "None":  # KV-args registration of one decode rank (mooncake/conn.py:1397)
            verdict = incompatibility(peer, peer_desc, "prefill", self.identity)
            if not verdict and len(frames) > 8:
                dst_tp = int(frames[8].decode("ascii") or 0)
                if dst_tp and dst_tp != self.attn_tp_size:
                    verdict = incompatibility(
                        dict(peer or {}, attn_tp_size=dst_tp), peer_desc, "prefill", self.identity
                    )
            with self._peer_lock:
                self._decode_sessions[session] = verdict
            if verdict:
                logger.error("SpectrumKV: %s", verdict)
            return frames
        with self._peer_lock:
            verdict = self._decode_sessions.get(session)
        if verdict is None:
            verdict = incompatibility(peer, peer_desc, "prefill", self.identity)
        if verdict:
            try:
                dst_port = int(frames[2].decode("ascii"))
                self._fail_room(
                    int(room), verdict, endpoint, dst_port, notify_reason=peer is not None
                )
            except ValueError:
                logger.error("SpectrumKV: malformed room message from %s dropped", endpoint)
            return None
        if grant is not None:
            with self._peer_lock:
                self._grants.setdefault(int(room), {})[session] = grant
        return frames

    def _fail_room(
        self,
        room: int,
        reason: str,
        endpoint: str | None = None,
        dst_port: int | None = None,
        notify_reason: bool = False,
    ) -> None:
        self._failed_rooms.add(room)
        self.record_failure(room, reason)
        self.update_status(room, KVPoll.Failed)
        if endpoint is None or dst_port is None:
            return
        na = NetworkAddress(endpoint, dst_port)
        sock = self._connect(na.to_tcp(), is_ipv6=na.is_ipv6)
        if notify_reason:  # only a SpectrumKV decode understands this message
            sock.send_multipart([FAIL_HEADER, str(room).encode("ascii"), reason.encode("utf-8")])
        self.sync_status_to_decode_endpoint(
            endpoint, dst_port, room, KVPoll.Failed, self._prefill_unique_rank()
        )

    def _fail_request(self, room: int, reason: str) -> None:
        """Fail one packed request before its transfer: prefill and every decode learn why."""
        logger.error("SpectrumKV: room %s failed: %s", room, reason)
        if self.metrics is not None:
            self.metrics.observe_failure()
        infos = list(self.transfer_infos.get(room, {}).values())
        if not infos:
            self._fail_room(room, reason)
        for info in infos:
            self._fail_room(room, reason, info.endpoint, info.dst_port, notify_reason=True)

    def drop_room(self, room: int) -> None:
        self._failed_rooms.discard(room)
        with self._peer_lock:
            self._grants.pop(room, None)

    def _find_req(self, room: int) -> Any:
        """The prefill ``Req`` of a room: at its last chunk it is in the inflight queue
        (``prefill.py:505-507`` appends it before ``send_kv_chunk``)."""
        sched = self.scheduler
        for name in ("disagg_prefill_inflight_queue",):
            for req in reversed(getattr(sched, name, None) or []):
                if getattr(req, "bootstrap_room", None) == room:
                    return req
        return None

    def _request_slots(self, room: int, pages: list[npt.NDArray[Any]]) -> tuple[torch.Tensor, str]:
        """Pool slots of the whole prompt and the request id."""
        page_size = int(self.kv_args.page_size)
        req = self._find_req(room)
        if req is not None:
            n = len(req.origin_input_ids)
            row = self.scheduler.req_to_token_pool.req_to_token[req.req_pool_idx, :n]
            return row.to(torch.int64), str(req.rid)
        all_pages = np.concatenate(pages) if pages else np.zeros(0, np.int64)
        if page_size != 1:
            raise RuntimeError(
                f"request of room {room} not found in the inflight queue; cannot tell its"
                f" prompt length with page size {page_size}"
            )
        return torch.from_numpy(expand_pages(all_pages, 1)), ""

    def _pack(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor
    ) -> Any:
        from sglang_spectrum.codec import pack_kv, plan_tiers

        from .probe_hook import resolved_tiers

        opts = self.spectrum_options
        cfg = opts.codec_config(
            budget=opts.budget,
            tiers=resolved_tiers(opts.tiers),
            allocator=opts.allocator,
            allow_drop=False,
        )
        if keys[0].is_cuda:
            try:
                from sglang_spectrum.kernels import kernel_supported, pack_from_pools

                layout, tiers = plan_tiers(keys, values, cfg)
                if kernel_supported(layout):
                    policy = f"{cfg.method}/{cfg.allocator}/{cfg.tiers}/b={cfg.budget:g}"
                    return pack_from_pools(
                        self.kv_pool.k_buffer,
                        self.kv_pool.v_buffer,
                        slots.to(keys[0].device),
                        layout,
                        tiers,
                        policy=policy,
                    )
            except ImportError:
                pass
        return pack_kv(keys, values, cfg)

    def send_packed(self, sender: SpectrumKVSender, state_indices: Any) -> None:
        """Last chunk of a request (scheduler thread): gather, pack, enqueue one transfer."""
        room = sender.bootstrap_room
        if room not in self.request_status or self.check_status(room) == KVPoll.Failed:
            return
        if room not in self.transfer_infos:
            return  # dummy rank for this request (mooncake/conn.py add_transfer_request)
        infos = self.transfer_infos[room]
        all_pages = np.concatenate(sender.pages) if sender.pages else np.zeros(0, np.int32)
        if infos and all(info.is_dummy for info in infos.values()):
            self.add_transfer_request(
                room, all_pages, slice(0, len(all_pages)), True, sender.aux_index, state_indices
            )
            return
        with self._peer_lock:
            grants = dict(self._grants.get(room, {}))
        missing = [s for s, info in infos.items() if not info.is_dummy and s not in grants]
        if missing:
            self._fail_request(
                room,
                f"decode session(s) {', '.join(missing)} reserved no receive buffer for"
                f" request {room} (not a SpectrumKV decode, or one of another protocol)",
            )
            return
        fault = None
        try:
            t0 = time.perf_counter()
            slots, rid = self._request_slots(room, sender.pages)
            fault = fault_for(rid, self._fault_counter)
            dev = self.kv_pool.k_buffer[0].device
            idx = slots.to(dev)
            keys = [k[idx] for k in self.kv_pool.k_buffer]
            values = [v[idx] for v in self.kv_pool.v_buffer]
            packed = self._pack(keys, values, slots)
            blob_head = torch.frombuffer(bytearray(packed.header_bytes), dtype=torch.uint8)
            nbytes = packed.nbytes
            cap = min(int(g.get("cap", 0)) for g in grants.values())
            if nbytes > cap:
                raise RuntimeError(
                    f"packed KV of {nbytes} bytes does not fit the {cap} bytes the decode"
                    f" server reserved (prefill budget {self.spectrum_options.budget:g});"
                    f" run the same sglang-spectrum version on both sides"
                )
            region = self.arena.alloc(nbytes) if self.arena is not None else None
            if region is None:  # arena full: a one-off registered buffer
                region = Region.one_off(nbytes, dev, self.engine)
            view = region.view(nbytes)
            h = blob_head.numel()
            view[:h].copy_(blob_head.to(dev))
            view[h:nbytes].copy_(packed.payload)
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()
            pack_ms = (time.perf_counter() - t0) * 1e3
        except Exception as e:
            logger.exception("SpectrumKV: packing room %s failed", room)
            self._fail_request(room, f"SpectrumKV could not pack the KV cache: {e}")
            return
        send_n, checksum = nbytes, int(packed.header.checksum)
        if fault is not None:
            send_n, checksum = self._inject_fault(fault, view, h, nbytes, checksum)
            logger.warning(
                "SpectrumKV TEST FAULT %r injected into room %s (rid %s)", fault, room, rid
            )
        counts = packed.tier_counts
        stats = {
            "role": "prefill",
            "rid": rid,
            "room": room,
            "num_tokens": int(packed.layout.num_tokens),
            "full_bytes": int(packed.full_nbytes),
            "sent_bytes": int(send_n),
            "ratio": round(send_n / max(packed.full_nbytes, 1), 4),
            "tiers": {k: v for k, v in counts.items() if k != "drop"},
            "tier_mode": packed.header.policy.split("/")[2] if packed.header.policy else "",
            "budget": self.spectrum_options.budget,
            "pack_ms": round(pack_ms, 3),
            "fault": fault,
        }
        sender.region = region
        chunk = SpectrumTransferChunk(
            room=room,
            prefill_kv_indices=all_pages,
            index_slice=slice(0, len(all_pages)),
            is_last_chunk=True,
            prefill_aux_index=sender.aux_index,
            state_indices=state_indices,
            region=region,
            nbytes=send_n,
            checksum=checksum,
            stats=stats,
        )
        self._enqueue(chunk)

    @staticmethod
    def _inject_fault(
        fault: str, view: torch.Tensor, head: int, nbytes: int, checksum: int
    ) -> tuple[int, int]:
        if fault == "corrupt" and nbytes > head:
            pos = head + (nbytes - head) // 2
            view[pos] = view[pos] ^ 0x5A
        elif fault == "header":
            view[20] = view[20] ^ 0x5A  # inside the msgpack header (CRC-checked)
        elif fault == "truncate":
            return max(nbytes // 2, 1), checksum
        elif fault == "stale":
            return nbytes, checksum ^ 1
        return nbytes, checksum

    def _enqueue(self, chunk: SpectrumTransferChunk) -> None:
        # as MooncakeKVManager.add_transfer_request (mooncake/conn.py:1554-1597)
        dst_infos = self.transfer_infos[chunk.room].keys()
        session_port_sum = sum(int(session.rsplit(":", 1)[1]) for session in dst_infos)
        shard_idx = session_port_sum % len(self.transfer_queues)
        self.transfer_queues[shard_idx].put(chunk)

    def transfer_worker(self, queue: Any, executor: Any, staging_buffer: Any = None) -> None:
        # upstream's loop, but send_kvcache can see which chunk it serves
        return super().transfer_worker(
            _ChunkTrackingQueue(queue, self._tls), executor, staging_buffer
        )

    def send_kvcache(
        self,
        mooncake_session_id: str,
        prefill_kv_indices: npt.NDArray[np.int32],
        dst_kv_ptrs: list[int],
        dst_kv_indices: npt.NDArray[np.int32],
        executor: Any,
    ) -> int:
        chunk = getattr(self._tls, "chunk", None)
        if isinstance(chunk, SpectrumTransferChunk):
            return self._send_packed(mooncake_session_id, chunk)
        return super().send_kvcache(
            mooncake_session_id, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices, executor
        )

    def _send_packed(self, session: str, chunk: SpectrumTransferChunk) -> int:
        """Transfer thread: the one Mooncake write, then SPECTRUM_SENT to the decode."""
        room = chunk.room
        with self._peer_lock:
            grant = self._grants.get(room, {}).get(session)
        info = self.transfer_infos.get(room, {}).get(session)
        if grant is None or info is None or chunk.region is None:
            logger.error("SpectrumKV: room %s lost its receive grant for %s", room, session)
            return -1
        delay = test_delay_s(chunk.stats.get("rid"))
        if delay > 0:
            logger.warning("SpectrumKV TEST: room %s transfer starts in %.1f s", room, delay)
            time.sleep(delay)
        t0 = time.perf_counter()
        ret = self._transfer_data(session, [(chunk.region.ptr, int(grant["ptr"]), chunk.nbytes)])
        transfer_ms = (time.perf_counter() - t0) * 1e3
        chunk.region.release()
        if ret != 0:
            logger.error(
                "SpectrumKV: Mooncake write of room %s to %s failed (%s)", room, session, ret
            )
            if self.metrics is not None:
                self.metrics.observe_failure()
            return ret
        stats = dict(chunk.stats, transfer_ms=round(transfer_ms, 3))
        na = NetworkAddress(info.endpoint, info.dst_port)
        sent = {"nbytes": chunk.nbytes, "checksum": chunk.checksum, "stats": stats}
        self._connect(na.to_tcp(), is_ipv6=na.is_ipv6).send_multipart(
            [SENT_HEADER, str(room).encode("ascii"), json.dumps(sent).encode("utf-8")]
        )
        if self.metrics is not None:
            self.metrics.observe_sent(stats)
        write_stats(stats)
        logger.debug(
            "SpectrumKV room %s sent: %d bytes in %.1f ms (%s)",
            room,
            chunk.nbytes,
            transfer_ms,
            json.dumps(stats, sort_keys=True),
        )
        return 0

    # ------------------------------------------------------------------ decode side

    def _on_decode_message(self, msg: list[bytes]) -> list[bytes] | None:
        if msg and msg[0] == FAIL_HEADER and len(msg) >= 3:
            room = int(msg[1].decode("ascii"))
            self._pinned_failures[room] = msg[2].decode("utf-8")
            return None
        if msg and msg[0] == SENT_HEADER and len(msg) >= 3:
            room = int(msg[1].decode("ascii"))
            try:
                self._sent_info[room] = json.loads(msg[2].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                self._sent_info[room] = {"error": "malformed SPECTRUM_SENT message"}
            return None
        return msg

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        if bootstrap_addr in self.prefill_info_table:
            return True
        if not super().try_ensure_parallel_info(bootstrap_addr):
            return False
        verdict = self._fetch_prefill_verdict(bootstrap_addr)
        if verdict is None:  # not all prefill ranks registered yet: retry later
            self.prefill_info_table.pop(bootstrap_addr, None)
            return False
        with self._peer_lock:
            self._prefill_verdicts[bootstrap_addr] = verdict
        if verdict:
            logger.error("SpectrumKV: %s", verdict)
        else:
            peer = self._prefill_peers.get(bootstrap_addr, {})
            logger.info(
                "SpectrumKV: prefill at %s verified (format v%s, protocol %s, layout %s,"
                " tiers %s, budget %s, rotation %s, group size %s, key scales %s)",
                bootstrap_addr,
                format_version(),
                PROTOCOL_VERSION,
                _layout_desc(peer.get("layout") or {}),
                peer.get("tiers_resolved"),
                (peer.get("options") or {}).get("budget"),
                (peer.get("options") or {}).get("rotation"),
                (peer.get("options") or {}).get("group_size") or "head_dim",
                (peer.get("options") or {}).get("key_scales", "token"),
            )
        return True

    def _fetch_prefill_verdict(self, bootstrap_addr: str) -> str | None:
        """'' = compatible, reason = refuse, None = ask again later."""
        desc = f"prefill at {bootstrap_addr}"
        try:
            r = requests.get(f"http://{bootstrap_addr}/spectrum/info", timeout=5)
        except Exception as e:
            logger.warning("SpectrumKV: %s: cannot read /spectrum/info: %s", desc, e)
            return None
        if r.status_code == 404:
            self._prefill_is_spectrum[bootstrap_addr] = False
            return incompatibility(None, desc, "decode")
        if r.status_code != 200:
            return None
        ranks = r.json().get("ranks", [])
        info = self.prefill_info_table.get(bootstrap_addr)
        expected = (
            info.dp_size * info.attn_cp_size * info.attn_tp_size * info.pp_size if info else 1
        )
        if len(ranks) < expected:
            return None
        self._prefill_is_spectrum[bootstrap_addr] = True
        local = dict(self.identity)
        for peer in ranks:
            verdict = incompatibility(peer, desc, "decode", local)
            if verdict:
                return verdict
        if info is not None and info.attn_tp_size != self.attn_tp_size:
            return incompatibility(
                dict(ranks[0], attn_tp_size=info.attn_tp_size), desc, "decode", local
            )
        if ranks:
            self._prefill_peers[bootstrap_addr] = ranks[0]
        return ""

    def prefill_verdict(self, bootstrap_addr: str) -> str:
        with self._peer_lock:
            return self._prefill_verdicts.get(bootstrap_addr, "")

    def prefill_is_spectrum(self, bootstrap_addr: str) -> bool:
        return self._prefill_is_spectrum.get(bootstrap_addr, False)

    def prefill_codec(self, bootstrap_addr: str) -> tuple[float, int | None, str]:
        """The prefill's announced budget, quantisation group size (None = head_dim) and
        key scales: what bounds the size of its packed buffers."""
        options = (self._prefill_peers.get(bootstrap_addr) or {}).get("options") or {}
        return (
            float(options.get("budget", 1.0)),
            options.get("group_size"),
            options.get("key_scales", "token"),
        )


# --------------------------------------------------------------------------- sender


class SpectrumKVSender(MooncakeKVSender):
    def __init__(self, *args: Any, **kwargs: Any):
        self.pages: list[npt.NDArray[Any]] = []
        self.region: Region | None = None
        super().__init__(*args, **kwargs)

    def send(
        self,
        kv_indices: npt.NDArray[np.int32],
        state_indices: list[int] | None = None,
    ) -> None:
        mgr = self.kv_mgr
        if mgr.is_dummy_cp_rank:
            return super().send(kv_indices, state_indices)
        # Non-last chunk: only remember the page indices; SGLang keeps those pages
        # allocated and locked (tree_cache.cache_unfinished_req) until the request
        # leaves the inflight queue, i.e. until this transfer has finished.
        self.pages.append(np.asarray(kv_indices).copy())
        self.curr_idx += len(kv_indices)
        if self.curr_idx < self.num_kv_indices:
            return
        mgr.send_packed(self, state_indices)

    def _release(self) -> None:
        if self.region is not None:
            self.region.release()
        self.kv_mgr.drop_room(self.bootstrap_room)

    def clear(self) -> None:
        self._release()
        super().clear()

    def failure_exception(self):
        self._release()
        return super().failure_exception()

    def abort(self):
        super().abort()
        if self.region is not None:
            self.region.release()


# --------------------------------------------------------------------------- receiver


class SpectrumKVReceiver(MooncakeKVReceiver):
    def __init__(self, *args: Any, **kwargs: Any):
        self._region: Region | None = None
        self._pages: npt.NDArray[Any] | None = None
        self._deferred: tuple[Any, Any, Any] | None = None
        self._deferred_logged = False
        self._need = 0
        self._extra_frames: list[bytes] = []
        self._spectrum_state: int | None = None
        self._success_seen_at: float | None = None
        super().__init__(*args, **kwargs)

    def init(self, prefill_dp_rank: int) -> None:
        reason = self.kv_mgr.prefill_verdict(self.bootstrap_addr)
        super().init(prefill_dp_rank)
        if reason and self.conclude_state is None:
            self._refuse(reason)

    def _refuse(self, reason: str) -> None:
        # Tell the prefill, so it frees the request now instead of holding it
        # until its bootstrap timeout (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT).
        room = str(self.bootstrap_room).encode("ascii")
        if self.kv_mgr.prefill_is_spectrum(self.bootstrap_addr):
            frames = [REJECT_HEADER, room, reason.encode("utf-8")]
        else:
            # An upstream prefill only understands room messages: a *dummy* one
            # (no destination indices, mooncake/conn.py:89-93) means "no KV wanted
            # from you"; it then finishes the request without transferring.
            frames = [
                room,
                self.kv_mgr.local_ip.encode("ascii"),
                str(self.kv_mgr.rank_port).encode("ascii"),
                self.session_id.encode("ascii"),
                b"",
                b"",
                b"",
                str(getattr(self, "required_dst_info_num", 1)).encode("ascii"),
            ]
        for info in getattr(self, "bootstrap_infos", None) or []:
            sock, lock = super()._connect_to_bootstrap_server(info)
            with lock:
                sock.send_multipart(frames)
        self._fail(reason)

    def _fail(self, reason: str) -> int:
        self.kv_mgr.record_failure(self.bootstrap_room, reason)
        self.conclude_state = KVPoll.Failed
        self._spectrum_state = KVPoll.Failed
        self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)
        self._release_region()
        return KVPoll.Failed

    def _connect_to_bootstrap_server(self, bootstrap_info: dict):
        sock, lock = super()._connect_to_bootstrap_server(bootstrap_info)
        return _TrailerSocket(sock, self._extra_frames + self.kv_mgr.identity_frames), lock

    # -- receive region

    def send_metadata(
        self,
        kv_indices: npt.NDArray[np.int32],
        aux_index: int | None = None,
        state_indices: list[int] | None = None,
    ) -> None:
        mgr = self.kv_mgr
        if self.bootstrap_infos is None or self.conclude_state is not None:
            return super().send_metadata(kv_indices, aux_index, state_indices)
        if mgr.arena is None or mgr.layout is None:
            self._refuse("SpectrumKV decode has no receive arena (KV pool not attached)")
            return
        self._pages = np.asarray(kv_indices).copy()
        self._need = receive_capacity(
            mgr.layout,
            len(self._pages) * int(mgr.layout["page_size"]),
            *mgr.prefill_codec(self.bootstrap_addr),
        )
        if self._need > mgr.arena.size:  # tell the prefill too (it would wait for a timeout)
            self._refuse(
                f"SpectrumKV: request {self.bootstrap_room} needs a {self._need}-byte receive"
                f" buffer but the decode receive arena has {mgr.arena.size} bytes; raise"
                f" --spectrum-arena-mb on the decode server"
            )
            return
        self._deferred = (kv_indices, aux_index, state_indices)
        self._try_send_deferred()

    def _try_send_deferred(self) -> bool:
        """Reserve the receive region and send the room message; False while the arena is full."""
        arena = self.kv_mgr.arena
        region = arena.alloc(self._need)
        if region is None:
            if not self._deferred_logged:
                self._deferred_logged = True
                logger.info(
                    "SpectrumKV: receive arena full (%d of %d bytes in use): request %s"
                    " (%d bytes) waits for a free region",
                    arena.in_use,
                    arena.size,
                    self.bootstrap_room,
                    self._need,
                )
            return False
        kv_indices, aux_index, state_indices = self._deferred
        self._deferred = None
        self._region = region
        grant = {"ptr": region.ptr, "cap": self._need}
        self._extra_frames = [GRANT_TAG, json.dumps(grant).encode("utf-8")]
        try:
            super().send_metadata(kv_indices, aux_index, state_indices)
        finally:
            self._extra_frames = []
        return True

    def _release_region(self) -> None:
        if self._region is not None:
            self._region.release()
        self._deferred = None

    # -- completion

    def poll(self) -> int:
        if self._spectrum_state is not None:
            return self._spectrum_state
        if self._deferred is not None and self.conclude_state is None:
            if not self._try_send_deferred():
                return KVPoll.WaitingForInput  # back-pressure: the arena is full
        status = super().poll()
        if status == KVPoll.Failed:
            self._release_region()
            if self.kv_mgr.metrics is not None:
                self.kv_mgr.metrics.observe_failure()
            self._spectrum_state = KVPoll.Failed
            return status
        if status != KVPoll.Success:
            return status
        if self._region is None:  # nothing was reserved (dummy / refused)
            self._spectrum_state = status
            return status
        sent = self.kv_mgr._sent_info.pop(self.bootstrap_room, None)
        if sent is None:
            now = time.monotonic()
            self._success_seen_at = self._success_seen_at or now
            if now - self._success_seen_at < SENT_INFO_TIMEOUT_S:
                return KVPoll.Transferring
            return self._unpack_failed("the prefill never announced the packed KV size")
        return self._unpack(sent)

    def _unpack_failed(self, why: str) -> int:
        reason = f"SpectrumKV: packed KV of request {self.bootstrap_room} rejected: {why}"
        logger.error(reason)
        if self.kv_mgr.metrics is not None:
            self.kv_mgr.metrics.observe_failure()
        return self._fail(reason)

    def _unpack(self, sent: dict[str, Any]) -> int:
        from sglang_spectrum.codec import read_header, unpack_kv

        mgr = self.kv_mgr
        t0 = time.perf_counter()
        try:
            if "error" in sent:
                raise ValueError(sent["error"])
            nbytes = int(sent["nbytes"])
            if not 0 < nbytes <= self._region.capacity:
                raise ValueError(f"announced size {nbytes} outside the receive buffer")
            buf = self._region.view(nbytes)
            header, _ = read_header(buf)
            if int(header.checksum) != int(sent["checksum"]):
                raise ValueError(
                    "payload checksum differs from the one the prefill announced (stale or"
                    " foreign data in the receive buffer)"
                )
            page_size = int(mgr.layout["page_size"])
            n = int(header.layout.num_tokens)
            n_pages = len(self._pages)
            if not (n_pages - 1) * page_size < n <= n_pages * page_size:
                raise ValueError(
                    f"buffer holds {n} tokens, the request has {n_pages} pages of {page_size}"
                )
            slots = torch.from_numpy(expand_pages(self._pages, page_size)[:n])
            pool = mgr.kv_pool
            used_kernels = False
            if pool.k_buffer[0].is_cuda:
                try:
                    from sglang_spectrum.kernels import unpack_to_pools

                    info = unpack_to_pools(buf, pool.k_buffer, pool.v_buffer, slots)
                    used_kernels = True
                except ImportError:
                    pass
            if not used_kernels:
                info = unpack_kv(buf, pool.k_buffer, pool.v_buffer, slots)
            if pool.k_buffer[0].is_cuda:
                torch.cuda.current_stream(pool.k_buffer[0].device).synchronize()
            if len(info.dropped):
                raise ValueError(f"{len(info.dropped)} dropped tokens (serving never drops)")
        except Exception as e:
            return self._unpack_failed(f"{type(e).__name__}: {e}")
        unpack_ms = (time.perf_counter() - t0) * 1e3
        self._release_region()
        prefill_stats = sent.get("stats", {})
        stats = {
            "role": "decode",
            "rid": prefill_stats.get("rid", ""),
            "room": self.bootstrap_room,
            "num_tokens": n,
            "full_bytes": int(header.layout.full_nbytes),
            "received_bytes": nbytes,
            "tiers": {k: v for k, v in info.tier_counts.items() if k != "drop"},
            "unpack_ms": round(unpack_ms, 3),
            "prefill": prefill_stats,
        }
        if mgr.metrics is not None:
            mgr.metrics.observe_received(stats)
        write_stats(stats)
        logger.debug("SpectrumKV room %s unpacked: %s", self.bootstrap_room, json.dumps(stats))
        self._spectrum_state = KVPoll.Success
        return KVPoll.Success

    def clear(self) -> None:
        self._release_region()
        self.kv_mgr._pinned_failures.pop(self.bootstrap_room, None)
        self.kv_mgr._sent_info.pop(self.bootstrap_room, None)
        super().clear()

    def failure_exception(self):
        self._release_region()
        return super().failure_exception()

    def abort(self):
        super().abort()
        self._release_region()


class SpectrumKVBootstrapServer(MooncakeKVBootstrapServer):
    """Mooncake bootstrap server + ``/spectrum/register`` and ``/spectrum/info``."""

    def __init__(self, host: str, port: int):
        self.spectrum_ranks: dict[str, dict[str, Any]] = {}
        super().__init__(host, port)

    def _setup_routes(self) -> None:
        super()._setup_routes()
        self.app.router.add_put("/spectrum/register", self._handle_spectrum_register)
        self.app.router.add_get("/spectrum/info", self._handle_spectrum_info)

    async def _handle_spectrum_register(self, request):
        from aiohttp import web

        data = await request.json()
        key = "/".join(
            str(data.get(k)) for k in ("attn_dp_rank", "attn_cp_rank", "attn_tp_rank", "pp_rank")
        )
        async with self.lock:
            self.spectrum_ranks[key] = data
        return web.Response(text="OK", status=200)

    async def _handle_spectrum_info(self, request):
        from aiohttp import web

        async with self.lock:
            ranks = list(self.spectrum_ranks.values())
        if not ranks:
            return web.Response(text="No SpectrumKV prefill rank registered yet.", status=503)
        return web.json_response({"server": wire_identity(), "ranks": ranks}, status=200)


_CLASSES: dict[Any, type] = {
    KVClassType.KVARGS: KVArgs,
    KVClassType.MANAGER: SpectrumKVManager,
    KVClassType.SENDER: SpectrumKVSender,
    KVClassType.RECEIVER: SpectrumKVReceiver,
    KVClassType.BOOTSTRAP_SERVER: SpectrumKVBootstrapServer,
}


def get_class(class_type: Any) -> type | None:
    """``get_kv_class`` answer for the spectrum backend."""
    return _CLASSES.get(class_type)
