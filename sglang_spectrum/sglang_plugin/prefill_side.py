"""Prefill side of the ``spectrum`` KV manager: grants, the transfer thread, aborts.

A mixin of :class:`.manager.SpectrumKVManager` (it uses the manager's pools, arena,
engine, options, locks and SGLang's ``CommonKVManager`` status table). The
scheduler thread only calls :meth:`PrefillSide.submit` (last chunk) and
:meth:`PrefillSide.submit_part` (an earlier chunk, ``--spectrum-stream chunks``);
the transfer thread packs with :func:`sglang_spectrum.transfer.pack_request` on
its own CUDA stream, makes one Mooncake write per decode rank and part, and
reports ``Sent`` with every part's place in the decode's receive region.

Parts: each chunk's tokens are allocated their own share of the budget and
written while the next chunk is computed (what the stock backends gain from
per-chunk sends). Part ``i`` lands at :func:`~sglang_spectrum.transfer.part_offset`
of the bytes before it; a part is only accepted when the bounds of the parts
so far, this one and every token still to come fit the decode's grant, so the
last part always fits.
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
    context: torch.Tensor | None  # int64 [P] slots before these (scored, not sent)
    aux: list[bytes]  # the metadata row
    events: list[Any]  # torch.cuda.Events after which its KV is written (none on a CPU)
    rid: str
    final: bool = True  # the last chunk's part (False: an earlier chunk, more follow)
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
    reserved: int = 0  # bytes the accepted earlier parts may take (bounds, aligned)
    parts: list[list[int]] = field(default_factory=list)  # written: offset, bytes, sum, tokens
    part_totals: dict[str, float] = field(default_factory=dict)  # their stats, summed


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

    def _kv_written_events(self, *events: Any) -> list[Any]:
        """``events`` and a CUDA event after the KV writes queued so far on this
        thread's stream ([] on a CPU)."""
        if not (self.k_pools and self.k_pools[0].is_cuda):
            return []
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.k_pools[0].device))
        return [e for e in events if e is not None] + [event]

    def submit(
        self,
        sender: Any,
        rid: str,
        slots: torch.Tensor,
        context: torch.Tensor | None,
        t_start: float,
    ) -> None:
        """Scheduler thread, last chunk: hand the request (its tokens not sent in an
        earlier part) to the transfer thread (``t_start``: when the scheduler entered
        the sender, for the stats)."""
        room = sender.bootstrap_room
        aux = (
            read_aux_row(self.kv_args.aux_data_ptrs, self.kv_args.aux_item_lens, sender.aux_index)
            if sender.aux_index is not None
            else []
        )
        job = PackJob(room, slots, context, aux, self._kv_written_events(), rid)
        job.scheduler_ms = (time.perf_counter() - t_start) * 1e3
        with self._lock:
            state = self._rooms.setdefault(room, PrefillRoom())
            if state.aborted:
                return
            if len(state.grants) < state.required:
                state.job = job  # sent when the last grant arrives
                return
        self._jobs.put(job)

    def submit_part(
        self,
        sender: Any,
        slots: torch.Tensor,
        context: torch.Tensor | None,
        rest_tokens: int,
        event: Any = None,
    ) -> bool:
        """Scheduler thread, an earlier chunk: hand ``slots`` (int64 ``[T]``, whole
        pages) to the transfer thread as one part. Accepted only once every decode
        rank granted and when this part and the ``rest_tokens`` still to come fit the
        granted region after the parts before it; False leaves them to the next part.
        ``event``: a CUDA event SGLang recorded for this KV on another stream, or None."""
        from sglang_spectrum.transfer import part_offset

        t_start = time.perf_counter()
        room = sender.bootstrap_room
        with self._lock:
            state = self._rooms.get(room)
            if state is None or state.aborted or len(state.grants) < state.required:
                return False
            capacity = min(g.capacity for g in state.grants.values())
            cfg = self.codec_config()
            reserved = part_offset(state.reserved) + self.region_bound(int(slots.numel()), cfg)
            if part_offset(reserved) + self.region_bound(rest_tokens, cfg) > capacity:
                return False
            state.reserved = reserved
        job = PackJob(room, slots, context, [], self._kv_written_events(event), "", final=False)
        job.scheduler_ms = (time.perf_counter() - t_start) * 1e3
        self._jobs.put(job)
        return True

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
        """Pack one part (the whole request when it is the only one), write it at its
        offset in every decode rank's region; after the final part, report ``Sent``."""
        from sglang_spectrum.transfer import pack_request, part_offset

        room = job.room
        with self._lock:
            state = self._rooms.get(room)
            if state is None or state.aborted or self.request_status.get(room) == KVPoll.Failed:
                return
            grants = list(state.grants.values())
            state.in_flight = True
            offset = part_offset(sum(state.parts[-1][:2])) if state.parts else 0
        t0 = time.perf_counter()
        cfg = self.codec_config()
        if not job.final:  # its last tokens are not the prompt's recent window
            cfg = cfg.with_(window=0)
        bound = self.region_bound(int(job.slots.numel()), cfg)
        region = self.arena.alloc(bound)
        one_off = region is None
        device = self.k_pools[0].device
        register_ms = 0.0
        if one_off:  # arena full: a buffer registered for this request (cost in the stats)
            t_reg = time.perf_counter()
            region = Region.one_off(bound, device, self.engine)
            register_ms = (time.perf_counter() - t_reg) * 1e3
        fault = None
        try:
            slots = job.slots.to(device, non_blocking=True)
            context = None if job.context is None else job.context.to(device, non_blocking=True)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for event in job.events:  # the KV of this chunk is written
                    stream.wait_event(event)
                packed = pack_request(
                    self.k_pools, self.v_pools, slots, cfg, out=region.view(), context_slots=context
                )
            pack_ms = (time.perf_counter() - t0) * 1e3
            cap = min(g.capacity for g in grants)
            if offset + packed.nbytes > cap:
                raise RuntimeError(
                    f"packed KV of {packed.nbytes} bytes at offset {offset} does not fit the"
                    f" {cap} bytes the decode reserved; run the same sglang-spectrum version"
                    " on both sides"
                )
            send_n, checksum = packed.nbytes, packed.checksum
            if job.final:
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
                ret = self.engine.transfer_sync(
                    g.session, region.ptr, g.region_ptr + offset, send_n
                )
                if ret < 0:
                    raise RuntimeError(f"Mooncake write to {g.session} failed ({ret})")
            transfer_ms = (time.perf_counter() - t1) * 1e3
        finally:
            region.release()
        aborted = self._leave_flight(room)
        if aborted or self.request_status.get(room) == KVPoll.Failed:
            # aborted by the decode, or on this side while writing: the decode learns it now
            reason = self.failure_records.get(room, "aborted on the prefill")
            self._conclude_unsent(room, aborted, reason)
            return
        with self._lock:
            state = self._rooms.get(room)
            if state is None:
                return
            state.parts.append([offset, int(send_n), int(checksum), packed.num_tokens])
            totals = state.part_totals
            for key, value in (
                ("num_tokens", packed.num_tokens),
                ("full_bytes", packed.full_nbytes),
                ("sent_bytes", int(send_n)),
                ("pack_ms", pack_ms),
                ("transfer_ms", transfer_ms),
                ("register_ms", register_ms),
                ("one_off_regions", int(one_off)),
                *((f"tier_{k}", v) for k, v in packed.tier_counts.items() if k != "drop"),
            ):
                totals[key] = totals.get(key, 0) + value
            if not job.final:
                return
            parts = [list(p) for p in state.parts]
            totals = dict(totals)
        stats = {
            "role": "prefill",
            "rid": job.rid,
            "room": room,
            "tp_rank": int(self.attn_tp_rank),
            "kv_heads": int(self.layout["kv_heads"]),
            "num_tokens": int(totals["num_tokens"]),
            "context_tokens": 0 if job.context is None else int(job.context.numel()),
            "full_bytes": int(totals["full_bytes"]),
            "sent_bytes": int(totals["sent_bytes"]),
            "ratio": round(totals["sent_bytes"] / max(totals["full_bytes"], 1), 4),
            "tiers": {k[5:]: int(v) for k, v in totals.items() if k.startswith("tier_")},
            "tier_mode": self.tiers,
            "budget": self.options.budget,
            "key_scales": self.options.key_scales,
            "path": packed.path,
            "parts": len(parts),
            "scheduler_ms": round(job.scheduler_ms, 3),
            "queue_ms": round((t0 - job.enqueued) * 1e3, 3),
            # pack/transfer: every part; last_*: the final part, after the last chunk
            "pack_ms": round(totals["pack_ms"], 3),
            "transfer_ms": round(totals["transfer_ms"], 3),
            "last_pack_ms": round(pack_ms, 3),
            "last_transfer_ms": round(transfer_ms, 3),
            "pack_timings_ms": packed.timings_ms,
            "one_off_regions": int(totals["one_off_regions"]),
            "register_ms": round(totals["register_ms"], 3),
            "fault": fault,
        }
        for g in grants:
            self.send_to(
                g.endpoint,
                g.port,
                messages.Sent(room, stats["sent_bytes"], int(checksum), job.aux, stats, parts),
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
