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
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests
import torch
import zmq
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.common.conn import CommonKVManager
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.utils.network import NetworkAddress

from . import compat, faults, messages
from .identity import incompatibility, layout_desc, wire_identity
from .metrics import get_metrics, write_stats
from .options import check_no_drop, current_options, no_drop_floor
from .transport import (
    Region,
    RegisteredArena,
    arena_bytes,
    mooncake_engine,
    pool_nbytes,
    read_aux_row,
    write_aux_row,
)

logger = logging.getLogger(__name__)

ABORT_ACK_TIMEOUT_S = 60.0  # decode: keep an aborted region at most this long without ack


@dataclass
class PackJob:
    """One request handed from the prefill scheduler to the transfer thread."""

    room: int
    slots: torch.Tensor  # int64 [T] pool slots of the tokens to send
    context: torch.Tensor | None  # int64 [P] slots of the prefix the decode holds
    aux: list[bytes]  # the metadata row
    event: Any  # torch.cuda.Event recorded after the KV was written, or None
    rid: str
    enqueued: float = field(default_factory=time.perf_counter)
    scheduler_ms: float = 0.0  # time the scheduler thread spent on this request's send


@dataclass
class PrefillRoom:
    """Prefill-side state of one room: the decode grants and the transfer's progress."""

    grants: dict[str, messages.Grant] = field(default_factory=dict)
    required: int = 1
    job: PackJob | None = None  # parked until every grant is there
    in_flight: bool = False
    aborted: bool = False  # decode aborted: ack once nothing can be written any more
    ack_targets: list[tuple[str, int]] = field(default_factory=list)


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


class SpectrumKVManager(CommonKVManager):
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
            self.options.arena_mb, pool_nbytes(self.k_pools, self.v_pools), self.options.budget
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
        return wire_identity(self.options.to_dict(), **fields)

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

    # ------------------------------------------------------------------ prefill side

    def _on_prefill_message(self, msg: Any) -> None:
        if isinstance(msg, messages.Register):
            verdict = incompatibility(
                msg.identity, f"decode at {msg.endpoint}:{msg.port}", "prefill", self.identity()
            )
            with self._lock:
                self._sessions[msg.session] = verdict
            if verdict:
                logger.error("SpectrumKV: %s", verdict)
        elif isinstance(msg, messages.Grant):
            self._on_grant(msg)
        elif isinstance(msg, messages.Abort):
            self._on_abort(msg)

    def _on_grant(self, g: messages.Grant) -> None:
        with self._lock:
            verdict = self._sessions.get(g.session)
            if verdict is None:
                verdict = f"decode at {g.endpoint}:{g.port} did not register as a SpectrumKV decode"
            if verdict:
                self.record_failure(g.room, verdict)
                self.update_status(g.room, KVPoll.Failed)
                self.send_to(g.endpoint, g.port, messages.Failed(g.room, verdict))
                return
            state = self._rooms.setdefault(g.room, PrefillRoom())
            state.grants[g.session] = g
            state.required = max(1, g.required)
            self.req_to_decode_prefix_len[g.room] = g.prefix_len
            complete = len(state.grants) >= state.required
            job = state.job if complete else None
            if job is not None:
                state.job = None
        if complete:
            self.update_status(g.room, KVPoll.WaitingForInput)
        if job is not None:  # the prefill finished before the decode granted (optimistic)
            self._jobs.put(job)

    def _on_abort(self, a: messages.Abort) -> None:
        with self._lock:
            state = self._rooms.setdefault(a.room, PrefillRoom())
            state.aborted = True
            state.ack_targets.append((a.endpoint, a.port))
            state.job = None
            in_flight = state.in_flight
        logger.info("SpectrumKV: decode at %s:%s aborted room %s", a.endpoint, a.port, a.room)
        self.record_failure(a.room, a.reason or "the decode server aborted the request")
        self.update_status(a.room, KVPoll.Failed)
        if not in_flight:
            self._ack_abort(a.room)

    def _ack_abort(self, room: int) -> None:
        with self._lock:
            state = self._rooms.get(room)
            targets = list(state.ack_targets) if state else []
            if state:
                state.ack_targets.clear()
        for endpoint, port in targets:
            try:
                self.send_to(endpoint, port, messages.AbortAck(room))
            except Exception as e:
                logger.warning(
                    "SpectrumKV: could not acknowledge the abort of room %s: %s", room, e
                )

    def submit(
        self,
        sender: Any,
        rid: str,
        slots: torch.Tensor,
        context: torch.Tensor | None,
        t_start: float,
    ) -> None:
        """Scheduler thread, last chunk: hand the request to the transfer thread
        (``t_start``: when the scheduler entered the sender, for the stats)."""
        room = sender.bootstrap_room
        aux = (
            read_aux_row(self.kv_args.aux_data_ptrs, self.kv_args.aux_item_lens, sender.aux_index)
            if sender.aux_index is not None
            else []
        )
        event = None
        if self.k_pools and self.k_pools[0].is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.k_pools[0].device))
        job = PackJob(room, slots, context, aux, event, rid)
        job.scheduler_ms = (time.perf_counter() - t_start) * 1e3
        with self._lock:
            state = self._rooms.setdefault(room, PrefillRoom())
            if state.aborted:
                return
            if len(state.grants) < state.required:
                state.job = job  # sent when the last grant arrives
                return
        self._jobs.put(job)

    def fail_room(self, room: int, reason: str) -> None:
        """Fail one request on the prefill side and tell its decode ranks why."""
        logger.error("SpectrumKV: request of room %s failed: %s", room, reason)
        self.record_failure(room, reason)
        self.update_status(room, KVPoll.Failed)
        if self.metrics is not None:
            self.metrics.observe_failure()
        with self._lock:
            state = self._rooms.get(room)
            if state is not None and state.in_flight:
                return  # the transfer thread tells the decode once its write is over
            grants = list(state.grants.values()) if state else []
        for g in grants:
            try:
                self.send_to(g.endpoint, g.port, messages.Failed(room, reason))
            except Exception as e:
                logger.warning("SpectrumKV: could not tell %s:%s: %s", g.endpoint, g.port, e)

    def forget_room(self, room: int) -> None:
        with self._lock:
            state = self._rooms.get(room)
            if state is not None and not state.in_flight:
                del self._rooms[room]

    def _transfer_loop(self) -> None:
        stream = None
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                return
            if stream is None and self.k_pools and self.k_pools[0].is_cuda:
                stream = torch.cuda.Stream(device=self.k_pools[0].device)
            try:
                self._transfer(job, stream)
            except Exception as e:
                logger.error("SpectrumKV: transfer of room %s failed: %s", job.room, e)
                logger.debug("SpectrumKV: transfer failure details", exc_info=True)
                with self._lock:
                    state = self._rooms.get(job.room)
                    if state is not None:
                        state.in_flight = False
                    aborted = state is not None and state.aborted
                if aborted:
                    self._ack_abort(job.room)
                else:
                    self.fail_room(job.room, f"SpectrumKV could not send the KV cache: {e}")

    def _transfer(self, job: PackJob, stream: Any) -> None:
        from sglang_spectrum.transfer import pack_request, packed_size_bound

        room = job.room
        with self._lock:
            state = self._rooms.get(room)
            if state is None or state.aborted or self.request_status.get(room) == KVPoll.Failed:
                return
            grants = list(state.grants.values())
            state.in_flight = True
        t0 = time.perf_counter()
        cfg = self.codec_config()
        lay = self.layout
        bound = packed_size_bound(
            int(job.slots.numel()),
            lay["layers"],
            lay["kv_heads"],
            lay["head_dim"],
            lay["dtype"],
            cfg,
        )
        region = self.arena.alloc(bound)
        one_off = region is None
        device = self.k_pools[0].device
        register_ms = 0.0
        if one_off:  # arena full: a buffer registered for this request (cost in the stats)
            t_reg = time.perf_counter()
            region = Region.one_off(bound, device, self.engine)
            register_ms = (time.perf_counter() - t_reg) * 1e3
        try:
            slots = job.slots.to(device, non_blocking=True)
            context = None if job.context is None else job.context.to(device, non_blocking=True)
            if stream is not None:
                with torch.cuda.stream(stream):
                    if job.event is not None:
                        stream.wait_event(job.event)
                    packed = pack_request(
                        self.k_pools,
                        self.v_pools,
                        slots,
                        cfg,
                        out=region.view(),
                        context_slots=context,
                    )
            else:
                packed = pack_request(
                    self.k_pools, self.v_pools, slots, cfg, out=region.view(), context_slots=context
                )
            pack_ms = (time.perf_counter() - t0) * 1e3
            cap = min(g.capacity for g in grants)
            if packed.nbytes > cap:
                raise RuntimeError(
                    f"packed KV of {packed.nbytes} bytes does not fit the {cap} bytes the decode"
                    " reserved; run the same sglang-spectrum version on both sides"
                )
            send_n, checksum = packed.nbytes, packed.checksum
            fault = faults.fault_for(job.rid, self._fault_counter)
            if fault is not None:
                send_n, checksum = faults.inject(fault, region.view(), packed.nbytes, checksum)
                logger.warning("SpectrumKV TEST FAULT %r in room %s (rid %s)", fault, room, job.rid)
            delay = faults.test_delay_s(job.rid)
            if delay > 0:
                logger.warning("SpectrumKV TEST: room %s transfer starts in %.1f s", room, delay)
                time.sleep(delay)
            t1 = time.perf_counter()
            for g in grants:
                if self.request_status.get(room) == KVPoll.Failed:
                    break
                ret = self.engine.transfer_sync(g.session, region.ptr, g.region_ptr, send_n)
                if ret < 0:
                    raise RuntimeError(f"Mooncake write to {g.session} failed ({ret})")
            transfer_ms = (time.perf_counter() - t1) * 1e3
        finally:
            region.release()
        stats = {
            "role": "prefill",
            "rid": job.rid,
            "room": room,
            "num_tokens": packed.num_tokens,
            "context_tokens": 0 if job.context is None else int(job.context.numel()),
            "full_bytes": packed.full_nbytes,
            "sent_bytes": int(send_n),
            "ratio": round(send_n / max(packed.full_nbytes, 1), 4),
            "tiers": {k: v for k, v in packed.tier_counts.items() if k != "drop"},
            "tier_mode": self.tiers,
            "budget": self.options.budget,
            "key_scales": self.options.key_scales,
            "path": packed.path,
            "scheduler_ms": round(job.scheduler_ms, 3),
            "queue_ms": round((t0 - job.enqueued) * 1e3, 3),
            "pack_ms": round(pack_ms, 3),
            "pack_timings_ms": packed.timings_ms,
            "transfer_ms": round(transfer_ms, 3),
            "one_off_region": one_off,
            "register_ms": round(register_ms, 3),
            "fault": fault,
        }
        with self._lock:
            state.in_flight = False
            aborted = state.aborted
        if aborted or self.request_status.get(room) == KVPoll.Failed:
            if aborted:
                self._ack_abort(room)
            else:  # aborted on this side while writing: the decode learns it now
                self.fail_room(room, self.failure_records.get(room, "aborted on the prefill"))
            return
        for g in grants:
            self.send_to(
                g.endpoint, g.port, messages.Sent(room, int(send_n), int(checksum), job.aux, stats)
            )
        self.update_status(room, KVPoll.Success)
        if self.metrics is not None:
            self.metrics.observe_sent(stats)
        write_stats(stats)
        logger.debug("SpectrumKV room %s sent: %s", room, stats)

    # ------------------------------------------------------------------ decode side

    def register_receiver(self, room: int, receiver: Any) -> None:
        with self._lock:
            self._receivers[room] = receiver

    def unregister_receiver(self, room: int, receiver: Any) -> None:
        with self._lock:
            if self._receivers.get(room) is receiver:
                del self._receivers[room]

    def _sweep_aborted(self) -> None:
        """Free the regions of aborted requests whose prefill never acknowledged."""
        with self._lock:
            receivers = list(self._receivers.values())
        for receiver in receivers:
            receiver.expire_abort(ABORT_ACK_TIMEOUT_S)

    def _on_decode_message(self, msg: Any) -> None:
        with self._lock:
            receiver = self._receivers.get(msg.room)
        if receiver is None:
            logger.debug("SpectrumKV: %s for unknown room %s dropped", type(msg).__name__, msg.room)
            return
        if isinstance(msg, messages.Sent):
            receiver.on_sent(msg)
        elif isinstance(msg, messages.Failed):
            receiver.on_failed(msg.reason)
        elif isinstance(msg, messages.AbortAck):
            receiver.on_abort_ack()

    def unpack_into_pool(self, buf: torch.Tensor, slots: np.ndarray, sent: messages.Sent) -> Any:
        """Decode control thread: validate and unpack one request, write its metadata row."""
        from sglang_spectrum.transfer import unpack_request

        device = self.k_pools[0].device
        slots_t = torch.from_numpy(slots).to(device)
        if device.type == "cuda":
            stream = self._unpack_stream = getattr(
                self, "_unpack_stream", None
            ) or torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                info = unpack_request(
                    buf, self.k_pools, self.v_pools, slots_t, expected_checksum=sent.checksum
                )
        else:
            info = unpack_request(
                buf, self.k_pools, self.v_pools, slots_t, expected_checksum=sent.checksum
            )
        return info

    def write_aux(self, index: int, rows: list[bytes]) -> None:
        write_aux_row(self.kv_args.aux_data_ptrs, self.kv_args.aux_item_lens, index, rows)

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        if bootstrap_addr in self._prefill_verdicts:
            return super().try_ensure_parallel_info(bootstrap_addr)
        if not super().try_ensure_parallel_info(bootstrap_addr):
            return False
        verdict = self._fetch_prefill_verdict(bootstrap_addr)
        if verdict is None:  # not every prefill rank registered yet: ask again later
            self.prefill_info_table.pop(bootstrap_addr, None)
            return False
        with self._lock:
            self._prefill_verdicts[bootstrap_addr] = verdict
        if verdict:
            logger.error("SpectrumKV: %s", verdict)
        else:
            peer = self._prefill_peers.get(bootstrap_addr, {})
            logger.info(
                "SpectrumKV: prefill at %s verified (layout %s, tiers %s, options %s)",
                bootstrap_addr,
                layout_desc(peer.get("layout") or {}),
                peer.get("tiers_resolved"),
                peer.get("options"),
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
            self._foreign_prefills.add(bootstrap_addr)
            return incompatibility(None, desc, "decode")
        if r.status_code != 200:
            return None
        ranks = r.json().get("ranks", [])
        info = self.prefill_info_table.get(bootstrap_addr)
        expected = getattr(info, "attn_tp_size", 1) * getattr(info, "dp_size", 1) if info else 1
        if len(ranks) < expected:
            return None
        for peer in ranks:
            verdict = incompatibility(peer, desc, "decode", self.identity())
            if verdict:
                return verdict
        if info is not None and getattr(info, "attn_tp_size", None) not in (
            None,
            self.attn_tp_size,
        ):
            return incompatibility(
                dict(ranks[0], attn_tp_size=info.attn_tp_size), desc, "decode", self.identity()
            )
        if ranks:
            self._prefill_peers[bootstrap_addr] = ranks[0]
        return ""

    def prefill_is_foreign(self, bootstrap_addr: str) -> bool:
        return bootstrap_addr in self._foreign_prefills

    def room_aborted(self, room: int) -> bool:
        """Prefill: the decode aborted (or refused) this room already."""
        with self._lock:
            state = self._rooms.get(room)
            return state is not None and state.aborted

    def prefill_verdict(self, bootstrap_addr: str) -> str:
        with self._lock:
            return self._prefill_verdicts.get(bootstrap_addr, "")

    def prefill_codec(self, bootstrap_addr: str) -> Any:
        """The codec config the prefill at ``bootstrap_addr`` packs with (its budget and
        codec options, 2 tiers: the larger no-drop floor bounds either tier mode)."""
        from sglang_spectrum.config import SpectrumConfig

        o = (self._prefill_peers.get(bootstrap_addr) or {}).get("options") or {}
        return SpectrumConfig(
            budget=float(o.get("budget", 1.0)),
            tiers="2",
            group_size=o.get("group_size"),
            rotation=o.get("rotation", "none"),
            key_scales=o.get("key_scales", "token"),
            allow_drop=False,
        )
