"""The ``spectrum`` KV manager: SGLang's ``CommonKVManager`` + the packed-KV transport.

One manager per scheduler process (TP rank). ``CommonKVManager`` gives the ZMQ
PULL socket (``rank_port``), the prefill rank's registration at the bootstrap
server, the room status table, failure records, cached PUSH sockets and (decode)
the prefill discovery and heartbeat. On top of that this class runs:

* a **control thread** reading the PULL socket: our tagged messages
  (:mod:`.messages`): on the prefill ``Register``/``Grant``/``Abort`` from decode
  ranks; on the decode ``Sent``/``Failed``/``AbortAck`` from prefill ranks. The
  decode unpacks in this thread (off the scheduler loop): validate once, write
  the KV into the request's slots with :func:`sglang_spectrum.transfer.unpack_request`,
  write the metadata row, then mark the room ``Success``.
* (prefill) a **transfer thread**: the scheduler only enqueues a request at its
  last chunk (:meth:`submit`); this thread packs it with
  :func:`sglang_spectrum.transfer.pack_request` on its own CUDA stream (after an
  event recorded on the scheduler's stream, so the KV is final) straight into a
  registered send region, writes it with ONE Mooncake write into the receive
  region the decode granted, then sends ``Sent`` and marks the room ``Success``.

The KV pool is handed over at the end of ``Scheduler.__init__`` (:meth:`attach`,
from :mod:`.plugin`); the prefill then runs the INT4 probe and publishes its
identity at the bootstrap server.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import numpy as np
import requests
import torch
import zmq
from sglang.srt.disaggregation.base.conn import KVArgs
from sglang.srt.disaggregation.common.conn import CommonKVManager
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.utils.network import NetworkAddress

from . import compat, messages
from .decode_side import DecodeSide
from .identity import layout_desc, wire_identity
from .metrics import get_metrics
from .options import check_no_drop, current_options, no_drop_floor
from .prefill_side import PackJob, PrefillRoom, PrefillSide
from .transport import (
    RegisteredArena,
    arena_bytes,
    mooncake_engine,
    pool_nbytes,
)

logger = logging.getLogger(__name__)

MAX_PARTS = 64  # receive room for at most this many parts (the prefill merges beyond)


def pool_layout(k_pools: list[torch.Tensor], page_size: int) -> dict[str, Any]:
    k0 = k_pools[0]
    return {
        "layers": len(k_pools),
        "kv_heads": int(k0.shape[1]),
        "head_dim": int(k0.shape[2]),
        "dtype": str(k0.dtype).removeprefix("torch."),
        "page_size": int(page_size),
    }


def expand_pages(pages: np.ndarray, page_size: int) -> np.ndarray:
    """Page indices -> token slots (page * page_size + offset)."""
    pages = np.asarray(pages, dtype=np.int64).reshape(-1)
    if page_size == 1:
        return pages
    return (pages[:, None] * page_size + np.arange(page_size, dtype=np.int64)[None, :]).reshape(-1)


class SpectrumKVManager(PrefillSide, DecodeSide, CommonKVManager):
    """Packed-KV transfers over Mooncake on SGLang's ``CommonKVManager`` (see module doc)."""

    supports_role_switch = False

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: DisaggregationMode,
        server_args: Any,
        is_mla_backend: bool | None = False,
    ):
        compat.check_sglang_version()
        self.options = current_options()
        self.is_prefill = disaggregation_mode == DisaggregationMode.PREFILL
        self.role = "prefill" if self.is_prefill else "decode"
        self.k_pools: list[torch.Tensor] = []
        self.v_pools: list[torch.Tensor] = []
        self.layout: dict[str, Any] | None = None
        self.arena: RegisteredArena | None = None
        self.metrics: Any = None
        self.scheduler: Any = None
        self.tiers = self.options.tiers if self.options.tiers != "auto" else "2"
        self._lock = threading.RLock()
        self._rooms: dict[int, PrefillRoom] = {}  # prefill
        self._sessions: dict[str, str] = {}  # prefill: decode session -> '' ok | reason
        self._receivers: dict[int, Any] = {}  # decode: room -> SpectrumKVReceiver
        self._prefill_verdicts: dict[str, str] = {}  # decode: bootstrap addr -> '' | reason
        self._prefill_peers: dict[str, dict[str, Any]] = {}  # decode: addr -> identity
        self._foreign_prefills: set[str] = set()  # decode: prefills of another backend
        self._foreign_aborts: list[tuple[float, Any]] = []  # decode: (first sent, notify)
        self._last_sweep = 0.0
        self._jobs: queue.Queue[PackJob | None] = queue.Queue()
        self._fault_counter = [0]
        self._stop = threading.Event()
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        if is_mla_backend:
            raise RuntimeError("SpectrumKV supports MHA KV pools only (this model uses MLA)")
        if getattr(args, "state_types", None):
            raise RuntimeError(
                "SpectrumKV supports plain MHA KV pools only; this model also has"
                f" {[str(s) for s in args.state_types]} state (hybrid SWA/mamba/DSA pools)"
            )
        if self.pp_size != 1 or self.attn_cp_size != 1:
            raise RuntimeError("SpectrumKV does not support pipeline or context parallelism")
        self.engine = mooncake_engine(self.local_ip, args.gpu_id, args.ib_device or None)
        self.session_id = self.engine.get_session_id()
        threading.Thread(target=self._control_loop, name="spectrum-control", daemon=True).start()
        if self.is_prefill:
            threading.Thread(
                target=self._transfer_loop, name="spectrum-transfer", daemon=True
            ).start()
        else:
            self._start_heartbeat_checker_thread()

    # ------------------------------------------------------------------ contract hooks

    def should_verify_kv_checksum(self, bootstrap_addr: str) -> bool:
        return False  # lossy KV: the prefill's checksum of its 16-bit KV cannot match

    # ------------------------------------------------------------------ startup

    def attach(self, scheduler: Any) -> None:
        """Take the KV pool at the end of ``Scheduler.__init__``; prefill: probe, publish."""
        self.scheduler = scheduler
        pool = compat.kv_pool(scheduler)
        problem = self._unsupported(pool)
        if problem:
            raise RuntimeError(f"SpectrumKV cannot serve this model: {problem}")
        self.k_pools, self.v_pools = list(pool.k_buffer), list(pool.v_buffer)
        self.layout = pool_layout(self.k_pools, self.kv_args.page_size)
        check_no_drop(self.options, self.layout["head_dim"])
        size = arena_bytes(
            self.options.arena_mb,
            pool_nbytes(self.k_pools, self.v_pools),
            self.options.budget,
            self._largest_region(scheduler),
        )
        device = self.k_pools[0].device
        self.arena = RegisteredArena(
            size, device, self.engine, "send" if self.is_prefill else "receive"
        )
        self.metrics = get_metrics(self.server_args, self.role)
        logger.info(
            "SpectrumKV %s: KV pool %s (%s), %s arena %.1f MiB on %s, options %s",
            self.role,
            type(pool).__name__,
            layout_desc(self.layout),
            self.arena.name,
            size / (1 << 20),
            device,
            self.options.to_dict(),
        )
        if self.is_prefill:
            self._resolve_tiers(scheduler)
            if self.metrics is not None:
                self.metrics.set_mode(self.tiers, self.options.budget)
            self._publish_identity()

    def _unsupported(self, pool: Any) -> str:
        name = type(pool).__name__
        if not (hasattr(pool, "k_buffer") and hasattr(pool, "v_buffer")):
            return f"{name} has no per-layer k_buffer/v_buffer (MHA token pools only)"
        if any(s in name for s in ("SWA", "Hybrid", "NSA", "DSA", "MXFP", "FP4", "MLA")):
            return f"{name}: only plain MHA pools are supported"
        if getattr(pool, "use_hnd", False):
            return "HND KV layout is not supported (NHD only)"
        k, v = list(pool.k_buffer), list(pool.v_buffer)
        if not k or len(k) != len(v) or any(t.dim() != 3 for t in [*k, *v]):
            return f"{name}: expected per-layer [slots, kv_heads, head_dim] K and V buffers"
        dt = k[0].dtype
        if dt not in (torch.float16, torch.bfloat16, torch.float32):
            return f"KV cache dtype {dt} is not supported (16/32-bit float pools only)"
        ptrs = [t.data_ptr() for t in [*k, *v]]
        if list(self.kv_args.kv_data_ptrs)[: len(ptrs)] != ptrs:
            return "the KV pool's buffers differ from the ones SGLang registers for transfer"
        return ""

    def _resolve_tiers(self, scheduler: Any) -> None:
        if self.options.tiers != "auto":
            self.tiers = self.options.tiers
            return
        if self.options.budget >= 1.0:  # everything FP16: no INT4 to decide on
            logger.info("SpectrumKV: budget 1.0 sends every token at FP16; INT4 probe skipped")
            self.tiers = "3"
            return
        from .probe_hook import run_startup_probe

        decision = run_startup_probe(scheduler, self.server_args, self.options)
        self.tiers = str(decision.get("tiers", "2"))
        floor = no_drop_floor(
            self.tiers, self.layout["head_dim"], self.options.group_size, self.options.key_scales
        )
        if self.options.budget < floor:
            logger.warning(
                "SpectrumKV: the probe chose %s tiers; --spectrum-budget %g is below their"
                " no-drop floor %.3f, long prompts will be sent at that floor",
                self.tiers,
                self.options.budget,
                floor,
            )

    def identity(self) -> dict[str, Any]:
        fields: dict[str, Any] = dict(
            layout=self.layout, attn_tp_size=self.attn_tp_size, role=self.role
        )
        if self.is_prefill:
            fields["tiers_resolved"] = self.tiers
            fields["stream_chunk_tokens"] = self.stream_chunk_tokens()
        return wire_identity(self.options.to_dict(), **fields)

    def region_bound(self, num_tokens: int, config: Any, chunk_tokens: int = 0) -> int:
        """Bytes of a send/receive region for ``num_tokens`` tokens of this server's KV
        layout packed under ``config`` (:func:`~sglang_spectrum.transfer.packed_size_bound`),
        with room for one part per prefill chunk of ``chunk_tokens`` (0: one part); chunk
        ends need not fall on the receiver's tokens (one part more) and a cached prefix
        may go ahead (one more), at most :data:`MAX_PARTS`."""
        from sglang_spectrum.transfer import packed_size_bound

        parts = min(2 + -(-num_tokens // chunk_tokens), MAX_PARTS) if chunk_tokens > 0 else 1
        lay = self.layout
        return packed_size_bound(
            num_tokens,
            lay["layers"],
            lay["kv_heads"],
            lay["head_dim"],
            lay["dtype"],
            config,
            parts=parts,
        )

    def _largest_region(self, scheduler: Any) -> int:
        """Bytes of the send/receive region of the longest request this server admits
        (context length, at most the pool): the receive side's bound (2-tier no-drop
        floor, one part per chunk) under this server's options."""
        tokens = int(self.k_pools[0].shape[0])
        context = getattr(getattr(scheduler, "model_config", None), "context_len", None)
        if context:
            tokens = min(tokens, int(context))
        chunk = int(getattr(self.server_args, "chunked_prefill_size", None) or 0)
        return self.region_bound(tokens, self.options.bound_codec(), chunk)

    def stream_chunk_tokens(self) -> int:
        """Prefill: the chunk size its requests are sent in parts of (0 = one part)."""
        size = int(getattr(self.server_args, "chunked_prefill_size", None) or 0)
        return size if self.options.stream == "chunks" and size > 0 else 0

    def _bootstrap_url(self) -> str:
        # the host CommonKVManager.register_to_bootstrap registers at
        if self.dist_init_addr:
            host = NetworkAddress.parse(self.dist_init_addr).resolved().host
        else:
            host = self.bootstrap_host
        return NetworkAddress(host, self.bootstrap_port).to_url()

    def _publish_identity(self) -> None:
        payload = dict(
            self.identity(), attn_tp_rank=self.attn_tp_rank, attn_dp_rank=self.attn_dp_rank
        )
        try:
            r = requests.put(f"{self._bootstrap_url()}/spectrum/register", json=payload, timeout=5)
            if r.status_code != 200:
                logger.error("SpectrumKV registration refused: %s %s", r.status_code, r.text)
        except Exception as e:
            logger.error("SpectrumKV could not register at the bootstrap server: %s", e)

    def codec_config(self) -> Any:
        return self.options.codec_config(
            budget=self.options.budget,
            tiers=self.tiers,
            allocator=self.options.allocator,
            allow_drop=False,
        )

    # ------------------------------------------------------------------ messaging

    def send_to(self, endpoint: str, port: int, msg: Any) -> None:
        na = NetworkAddress(endpoint, port)
        self._send_multipart_locked(na.to_tcp(), messages.encode(msg), is_ipv6=na.is_ipv6)

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server_socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(500):
                if not self.is_prefill:
                    self._sweep_aborted()
                continue
            frames = self.server_socket.recv_multipart()
            msg = messages.decode(frames)
            try:
                if msg is None:
                    logger.warning(
                        "SpectrumKV: dropped a message that is not ours (%d frames)", len(frames)
                    )
                elif self.is_prefill:
                    self._on_prefill_message(msg)
                else:
                    self._on_decode_message(msg)
            except Exception:  # never let one message kill the control thread
                logger.exception("SpectrumKV: failed to handle %s", type(msg).__name__)
