"""Prefill side of the ``spectrum`` KV manager: grants, the transfer thread, aborts.

A mixin of :class:`.manager.SpectrumKVManager` (it uses the manager's pools, arena,
engine, options, locks and SGLang's ``CommonKVManager`` status table). The
scheduler thread only calls :meth:`PrefillSide.submit`; the transfer thread
packs with :func:`sglang_spectrum.transfer.pack_request` on its own CUDA stream,
makes one Mooncake write per decode rank and reports ``Sent``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from sglang.srt.disaggregation.base.conn import KVPoll

from . import faults, messages
from .identity import incompatibility
from .metrics import write_stats
from .transport import Region, read_aux_row

logger = logging.getLogger(__name__)


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
    prefix_len: int = 0  # tokens the decode already holds (SGLang pops its own copy)
    job: PackJob | None = None  # parked until every grant is there
    in_flight: bool = False
    aborted: bool = False  # decode aborted: ack once nothing can be written any more
    ack_targets: list[tuple[str, int]] = field(default_factory=list)


class PrefillSide:
    """Prefill-side behaviour of the manager (see the module docstring)."""

    _jobs: queue.Queue

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
            state.prefix_len = g.prefix_len
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
                self._conclude_unsent(
                    job.room,
                    self._leave_flight(job.room),
                    f"SpectrumKV could not send the KV cache: {e}",
                )

    def _leave_flight(self, room: int) -> bool:
        """The transfer of ``room`` is over (no write can land any more); returns whether
        the decode aborted it. Atomic with :meth:`_on_abort`'s look at ``in_flight``."""
        with self._lock:
            state = self._rooms.get(room)
            if state is None:
                return False
            state.in_flight = False
            return state.aborted

    def _conclude_unsent(self, room: int, aborted: bool, reason: str) -> None:
        """A transfer ended without ``Sent``: acknowledge the decode's abort, or tell it why."""
        if aborted:
            self._ack_abort(room)
        else:
            self.fail_room(room, reason)

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
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if job.event is not None:  # the KV of the last chunk is written
                    stream.wait_event(job.event)
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
        aborted = self._leave_flight(room)
        if aborted or self.request_status.get(room) == KVPoll.Failed:
            # aborted by the decode, or on this side while writing: the decode learns it now
            reason = self.failure_records.get(room, "aborted on the prefill")
            self._conclude_unsent(room, aborted, reason)
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

    def room_prefix_len(self, room: int) -> int:
        """Tokens of this room's prompt the decode holds already (from its grant)."""
        with self._lock:
            state = self._rooms.get(room)
            return state.prefix_len if state is not None else 0

    def room_aborted(self, room: int) -> bool:
        """Prefill: the decode aborted (or refused) this room already."""
        with self._lock:
            state = self._rooms.get(room)
            return state is not None and state.aborted
