"""Prefill side of the ``spectrum`` KV manager: grants, transfer workers, aborts.

A mixin of :class:`.manager.SpectrumKVManager` (it uses the manager's pools, arena,
engine, options and SGLang's ``CommonKVManager`` status table). The scheduler
thread hands jobs over in :mod:`.prefill_intake`.
The room state machine is :class:`.rooms.PrefillRooms`; the jobs run in
:class:`.workers.TransferWorkers` (one pack -> write pipeline per decode peer):
:meth:`PrefillSide._pack_stage` packs with
:func:`sglang_spectrum.transfer.pack_request` on the packer's own CUDA stream
into a registered send region, :meth:`PrefillSide._write_stage` makes one
Mooncake write per decode rank and part and, after the last part, reports
``Sent`` with every part's place in the decode's receive region.

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
import threading
import time
from typing import Any

import numpy as np
import torch
from sglang.srt.disaggregation.base.conn import KVPoll

from . import faults, messages
from .adaptive import AdaptiveBudget
from .direct import direct_writes, write_direct
from .identity import incompatibility
from .jobs import Packed, PackJob
from .metrics import since_ms, unix_ms, write_stats
from .rooms import ORPHAN_TTL_S, AckTarget, PrefillRooms
from .transport import Region
from .workers import FailedSessions, TransferWorkers

logger = logging.getLogger(__name__)

SEND_REGION_WAIT_S = 2.0  # wait this long for a free send region before a one-off one


class PrefillSide:
    """Prefill-side behaviour of the manager (see the module docstring)."""

    rooms: PrefillRooms

    def _init_prefill(self) -> None:
        # a room no sender ever claimed outlives SGLang's bootstrap timeout a little
        timeout = float(getattr(self, "bootstrap_timeout", ORPHAN_TTL_S - 30))
        self.rooms = PrefillRooms(orphan_ttl_s=timeout + 30)
        self._failed_sessions = FailedSessions()
        self._verdicts: dict[str, str] = {}  # decode identity digest -> '' ok | reason
        self._workers = TransferWorkers(
            self._pack_stage, self._write_stage, self._job_crashed, name="prefill"
        )
        opts = self.options
        self.adaptive = AdaptiveBudget(opts.min_budget, opts.ttft_slo_ms) if opts.adaptive else None
        self._peer_bytes: dict[tuple, int] = {}  # packed bytes waiting for each peer's writer
        self._peer_lock = threading.Lock()
        self._thread_local = threading.local()

    # ------------------------------------------------------------------ messages

    def _on_prefill_message(self, msg: Any) -> None:
        if isinstance(msg, messages.Register):
            self._decode_verdict(msg.identity, msg.endpoint, msg.port)
            self._failed_sessions.forgive(msg.session)  # a (re)started decode
        elif isinstance(msg, messages.Grant):
            self._on_grant(msg)
        elif isinstance(msg, messages.Abort):
            self._on_abort(msg)

    def _decode_verdict(self, identity: dict[str, Any], endpoint: str, port: int) -> str:
        """'' if a decode with ``identity`` fits this prefill, else why not (cached)."""
        key = repr(sorted(identity.items())) if identity else ""
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = incompatibility(
                identity, f"decode at {endpoint}:{port}", "prefill", self.identity()
            )
            self._verdicts[key] = verdict
            if verdict:
                logger.error("SpectrumKV: %s", verdict)
        return verdict

    def room_sent_bytes(self, room: int) -> int:
        """Packed bytes written for ``room`` so far (0: none, or the room is gone)."""
        state = self.rooms.get(room)
        return int(state.part_totals.get("sent_bytes", 0)) if state is not None else 0

    def _room_alive(self, room: int) -> bool:
        """SGLang still tracks this room's sender (its status entry exists)."""
        return room in self.request_status

    def _fail_status(self, room: int, reason: str) -> None:
        """Record a failure for a room SGLang still tracks (never re-creates a cleared one)."""
        if self._room_alive(room):
            self.record_failure(room, reason)
            self.update_status(room, KVPoll.Failed)

    def _on_grant(self, g: messages.Grant) -> None:
        verdict = self._decode_verdict(g.identity, g.endpoint, g.port)
        stale = bool(g.prefill_instance) and g.prefill_instance != self.instance_id
        if stale:
            verdict = (
                f"SpectrumKV: the prefill at {self._bootstrap_url()} restarted since the decode"
                " verified it; retry the request"
            )
        if verdict:
            self._fail_status(g.room, verdict)
            failed = messages.Failed(g.room, g.generation, verdict, stale)
            self._send_quietly(g.endpoint, g.port, failed)
            return
        self._failed_sessions.forgive(g.session)
        outcome, job = self.rooms.grant(g)
        if outcome == "stale":
            logger.debug("SpectrumKV: grant for cleared room %s dropped", g.room)
        elif outcome == "failed":  # the prefill gave the room up before this grant came
            self._tell_failure(g.room, job, self.rooms.get(g.room).failed)
        elif outcome == "complete":
            self._mark_ready(g.room, g.prefix_len)
            if job is not None:  # the prefill finished before the decode granted
                self._workers.submit(self.rooms.get(g.room).peer_key, job)

    def _on_abort(self, a: messages.Abort) -> None:
        target = AckTarget(a.endpoint, a.port, a.generation)
        logger.info("SpectrumKV: decode at %s:%s aborted room %s", a.endpoint, a.port, a.room)
        self._fail_status(a.room, a.reason or "the decode server aborted the request")
        self._ack(a.room, self.rooms.abort(a.room, target))

    def _tell_failure(self, room: int, grants: list[messages.Grant], reason: str) -> None:
        for g in grants:
            self._send_quietly(g.endpoint, g.port, messages.Failed(room, g.generation, reason))

    def _ack(self, room: int, targets: list[AckTarget]) -> None:
        for t in targets:
            self._send_quietly(t.endpoint, t.port, messages.AbortAck(room, t.generation))

    def _send_quietly(self, endpoint: str, port: int, msg: Any) -> None:
        try:
            self.send_to(endpoint, port, msg)
        except Exception as e:
            logger.warning(
                "SpectrumKV: could not send %s to %s:%s: %s", type(msg).__name__, endpoint, port, e
            )

    # ------------------------------------------------------------------ scheduler thread

    def _mark_ready(self, room: int, prefix_len: int) -> None:
        """Every decode rank granted and the sender exists: SGLang may send the KV."""
        if self._room_alive(room):
            with self.rooms.lock:
                state = self.rooms.get(room)
                if state is not None and not state.ready_at:
                    state.ready_at = time.perf_counter()
            self.req_to_decode_prefix_len[room] = prefix_len
            self.update_status(room, KVPoll.WaitingForInput)

    def _add_peer_bytes(self, peer: tuple, n: int) -> None:
        with self._peer_lock:
            left = self._peer_bytes.get(peer, 0) + int(n)
            if left:
                self._peer_bytes[peer] = left
            else:
                self._peer_bytes.pop(peer, None)

    def _part_budget(self, job: PackJob, state: Any, direct: bool) -> float | None:
        """The budget of this part under ``--spectrum-budget auto`` (None: fixed);
        ``direct``: a lossless part would be written page to page."""
        if self.adaptive is None:
            return None
        peer = state.peer_key
        full = int(job.slots.numel()) * self.full_bytes_per_token()
        return self.adaptive.choose(
            peer,
            full,
            self._peer_bytes.get(peer, 0),  # (a racy read is fine for an estimate)
            job.rest_tokens,
            time.perf_counter() - (job.request_start or job.enqueued),
            job.request_tokens,
            direct=direct,
        )

    def _direct_grant(self, grants: list[messages.Grant]) -> messages.Grant | None:
        """The one grant whose pool takes this prefill's pool pages as they are (see
        :mod:`.direct`), or None."""
        mem = self.pool_memory
        if mem is None or len(grants) != 1:
            return None
        g = grants[0]
        if g.page_size < 1 or not mem.fits(g.pool_ptrs, g.slot_bytes, g.pool_dtype):
            return None
        return g

    def _direct_writes(
        self, job: PackJob, state: Any, g: messages.Grant | None, budget: float
    ) -> Any:
        """The Mooncake writes of this lossless part page to page into the pool of ``g``
        (:meth:`_direct_grant`), or None (the part is packed: a budget below 1.0, no
        direct grant, a fragmented pool)."""
        if g is None or budget < 1.0:
            return None
        from .prefill_intake import expand_pages

        t, first = int(job.slots.numel()), state.sent_tokens
        dst = expand_pages(np.frombuffer(g.pages, dtype="<i8"), g.page_size)[first : first + t]
        if dst.size != t:
            return None
        src = job.slots.cpu().numpy()  # (the last chunk's are on the pool's device)
        return direct_writes(src, dst, self.pool_memory, g.pool_ptrs)

    def _direct_part(self, job: PackJob, grants: list, writes: Any, t0: float) -> Packed:
        """A part written page to page: what the write stage needs, no region."""
        from sglang_spectrum.policy import TIER_NAMES
        from sglang_spectrum.transfer import PackedRequest

        t = int(job.slots.numel())
        nbytes = sum(writes[2])
        counts = dict.fromkeys(TIER_NAMES, 0)
        counts[TIER_NAMES[0]] = t
        full = t * self.full_bytes_per_token()
        host_ms = (time.perf_counter() - t0) * 1e3
        info = PackedRequest(nbytes, 0, t, full, counts, "direct", {"plan": host_ms})
        return Packed(
            None, messages.DIRECT_OFFSET, nbytes, 0, info, 1.0, grants, host_ms, 0.0, False,
            None, t0, direct=writes,
        )  # fmt: skip

    def fail_room(self, room: int, reason: str) -> None:
        """Fail one request on the prefill side and tell its decode ranks why (now, or
        the worker once the write in flight is over)."""
        state = self.rooms.get(room)
        if state is None or not state.failed:
            logger.error("SpectrumKV: request of room %s failed: %s", room, reason)
            if self.metrics is not None:
                self.metrics.observe_failure()
        self._fail_status(room, reason)
        self._tell_failure(room, self.rooms.fail(room, reason), reason)

    def sender_aborted(self, room: int, reason: str) -> None:
        """The scheduler aborted the sender: fail the room, remember when."""
        self.fail_room(room, reason)
        self.rooms.sender_aborted(room)

    def clear_stale_aborts(self) -> None:
        """Housekeeping: clear aborted senders SGLang released without ``clear()`` (its
        status and failure entries too, as ``CommonKVSender.clear`` would)."""
        for room in self.rooms.stale_aborted():
            self.request_status.pop(room, None)
            self.req_to_decode_prefix_len.pop(room, None)
            with self.failure_lock:
                self.failure_records.pop(room, None)
            self.forget_room(room)

    def forget_room(self, room: int) -> None:
        """The scheduler cleared the sender."""
        self.rooms.clear(room)
        self.close_intake(room)

    def room_prefix_len(self, room: int) -> int:
        """Tokens of this room's prompt the decode holds already (from its grant)."""
        state = self.rooms.get(room)
        return state.prefix_len if state is not None else 0

    def room_aborted(self, room: int) -> bool:
        """Prefill: the decode aborted (or refused) this room already."""
        state = self.rooms.get(room)
        return state is not None and state.aborted

    # ------------------------------------------------------------------ workers

    def _leave_flight(self, room: int) -> None:
        """A job of ``room`` is over: send the abort acks and failure notices now due."""
        targets, tell, reason = self.rooms.leave_flight(room)
        self._ack(room, targets)
        self._tell_failure(room, tell, reason)

    def _finish_unsent(self, room: int, reason: str) -> None:
        """A job ended without a write that counts: the room failed (unless the decode
        aborted it), and the job leaves the flight."""
        state = self.rooms.get(room)
        if state is not None and not state.aborted:
            self.fail_room(room, reason)
        self._leave_flight(room)

    def _job_crashed(self, job: PackJob, packed: Packed | None, error: BaseException) -> None:
        """A stage raised past its own error handling: release what the job holds, fail
        the room and let the job leave the flight (never strand a room in flight)."""
        if packed is not None and packed.region is not None:
            packed.region.release()
        self._finish_unsent(
            job.room, f"SpectrumKV transfer failed: {type(error).__name__}: {error}"
        )

    def _pack_stage(self, job: PackJob) -> Packed | None:
        """Packer thread: pack one part into a send region (None: dropped or failed)."""
        from sglang_spectrum.transfer import ChunkTiers, pack_request, part_offset

        room = job.room
        state = self.rooms.get(room)
        if state is None or not state.live or self.request_status.get(room) == KVPoll.Failed:
            reason = (state.failed if state else "") or "aborted on the prefill"
            self._finish_unsent(room, self.failure_records.get(room, reason))
            return None
        grants = list(state.grants.values())
        dead = self._failed_sessions.failed(g.session for g in grants)
        if dead is not None:
            self._finish_unsent(
                room, f"SpectrumKV: decode session {dead} is unreachable (its last write failed)"
            )
            return None
        offset = state.next_offset
        if job.final and int(job.slots.numel()) == 0:
            return self._nothing_to_send(job, offset, grants)
        region, one_off, register_ms = None, False, 0.0
        try:
            for event in job.events:  # the chunk's KV is written: pack timings stay clean
                event.synchronize()
            t0 = time.perf_counter()
            t = int(job.slots.numel())
            l0, l1 = job.layers or (0, len(self.k_pools))
            plan = state.group_plan if l0 > 0 else None  # the chunk's first group chose
            if plan is not None and plan[1].tier_map.numel() == t:
                cfg, tiers = plan
            else:
                direct_grant = self._direct_grant(grants) if job.layers is None else None
                budget = self._part_budget(job, state, direct_grant is not None)
                cfg, tiers = self.codec_config(budget), None
                writes = self._direct_writes(job, state, direct_grant, cfg.budget)
                if writes is not None:
                    state.sent_tokens += t
                    packed = self._direct_part(job, grants, writes, t0)
                    self._add_peer_bytes(state.peer_key, packed.nbytes)
                    return packed
                if not job.final:  # its last tokens are not the prompt's recent window
                    cfg = cfg.with_(window=0)
            bound = self.region_bound(t, cfg, layers=l1 - l0)
            region = self.arena.alloc_wait(
                bound, SEND_REGION_WAIT_S, cancelled=lambda: self.room_aborted(room)
            )
            if region is None:  # arena busy for long: a buffer of its own (in the stats)
                one_off = True
                t_reg = time.perf_counter()
                region = Region.one_off(bound, self.k_pools[0].device, self.engine)
                register_ms = (time.perf_counter() - t_reg) * 1e3
            stream = self._worker_stream()
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                # host -> device copies on this stream: ordered before the pack reads them
                # (a copy on another stream raced the pack; no test can force that
                # interleaving, the GPU request-path tests run the pack this way)
                device = self.k_pools[0].device
                slots = job.slots.to(device, non_blocking=True)
                context = None if job.context is None else job.context.to(device, non_blocking=True)
                info = pack_request(
                    self.k_pools[l0:l1],
                    self.v_pools[l0:l1],
                    slots,
                    cfg,
                    out=region.view(),
                    context_slots=context,
                    fp8=self.fp8 if self.fp8 is None else self.fp8.layers(l0, l1),
                    tiers=tiers,
                )
            if job.layers is not None and l0 == 0:  # the later groups of the chunk reuse it
                state.group_plan = (cfg, ChunkTiers.of(info))  # counts, plans: once
            pack_ms = (time.perf_counter() - t0) * 1e3
            if self.adaptive is not None:
                self.adaptive.observe_pack(cfg.budget, info.full_nbytes, pack_ms / 1e3)
            cap = min(g.capacity for g in grants)
            if offset + info.nbytes > cap:
                raise RuntimeError(
                    f"packed KV of {info.nbytes} bytes at offset {offset} does not fit the"
                    f" {cap} bytes the decode reserved; run the same sglang-spectrum version"
                    " on both sides"
                )
            send_n, checksum = info.nbytes, info.checksum
            fault = faults.fault_for(job.rid, self._fault_counter, job.final)
            if fault is not None:
                send_n, checksum = faults.inject(fault, region.view(), info.nbytes, checksum)
                logger.warning("SpectrumKV TEST FAULT %r in room %s (rid %s)", fault, room, job.rid)
            if self.staging is not None:
                region = self._stage_on_host(region, int(send_n), stream, room)
            state.next_offset = part_offset(offset + int(send_n))
            if l1 == len(self.k_pools):
                state.sent_tokens += t
            self._add_peer_bytes(state.peer_key, send_n)
        except Exception as e:
            if region is not None:
                region.release()
            logger.error("SpectrumKV: packing room %s failed: %s", room, e)
            logger.debug("SpectrumKV: pack failure details", exc_info=True)
            self._finish_unsent(room, f"SpectrumKV could not pack the KV cache: {e}")
            return None
        return Packed(
            region=region,
            offset=offset,
            nbytes=int(send_n),
            checksum=int(checksum),
            info=info,
            budget=cfg.budget,
            grants=grants,
            pack_ms=pack_ms,
            register_ms=register_ms,
            one_off=one_off,
            fault=fault,
            started=t0,
        )

    def _nothing_to_send(self, job: PackJob, offset: int, grants: list) -> Packed:
        """The last part of a request whose every remaining token the decode already
        holds (its radix cache matched the whole prompt, SGLang then sends 0 pages): no
        KV to pack or write, only ``Sent`` with the earlier parts and the metadata row."""
        from sglang_spectrum.policy import TIER_NAMES
        from sglang_spectrum.transfer import PackedRequest

        info = PackedRequest(0, 0, 0, 0, dict.fromkeys(TIER_NAMES, 0), "none", {})
        now = time.perf_counter()
        return Packed(None, offset, 0, 0, info, 1.0, grants, 0.0, 0.0, False, None, now)

    def _stage_on_host(self, region: Region, nbytes: int, stream: Any, room: int) -> Region:
        """``--spectrum-staging host``: copy a packed part into the pinned host staging
        arena (one asynchronous copy on this worker's stream) and release its device
        region; the writer sends the host copy, so Mooncake's TCP transport never copies
        GPU memory itself (it does so 64 KiB at a time with blocking ``cudaMemcpy``)."""
        host = self.staging.alloc_wait(
            nbytes, SEND_REGION_WAIT_S, cancelled=lambda: self.room_aborted(room)
        )
        if host is None:
            host = Region.one_off(nbytes, torch.device("cpu"), self.engine)
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                host.view()[:nbytes].copy_(region.view()[:nbytes], non_blocking=True)
            if stream is not None:
                stream.synchronize()
        except BaseException:
            host.release()
            raise
        region.release()
        return host

    def _worker_stream(self) -> Any:
        """This thread's CUDA stream (made once per thread), or None on a CPU."""
        if not (self.k_pools and self.k_pools[0].is_cuda):
            return None
        local = self._thread_local
        if getattr(local, "stream", None) is None:
            local.stream = torch.cuda.Stream(device=self.k_pools[0].device)
        return local.stream

    def _write_stage(self, job: PackJob, p: Packed) -> None:
        """Writer thread: write one packed part into every decode rank's region; after
        the final part, report ``Sent``."""
        room = job.room
        peer = tuple(sorted(g.session for g in p.grants))
        t1 = time.perf_counter()
        if p.region is not None or p.direct is not None:
            if not self._write_part(job, p, peer):
                return
        transfer_ms = (time.perf_counter() - t1) * 1e3
        state = self.rooms.get(room)
        if state is None or not state.live or self.request_status.get(room) == KVPoll.Failed:
            # aborted by the decode, or failed on this side while writing
            reason = (state.failed if state else "") or "aborted on the prefill"
            self._finish_unsent(room, self.failure_records.get(room, reason))
            return
        self._record_part(job, p, transfer_ms)
        self._leave_flight(room)

    def _write_part(self, job: PackJob, p: Packed, peer: tuple) -> bool:
        """Write one packed part into every decode rank's region and free the send
        region; False when a write failed (the room is then finished as failed)."""
        room, t1 = job.room, time.perf_counter()
        try:
            delay = self._test_delay_s(job)
            if delay > 0:
                logger.warning("SpectrumKV TEST: room %s transfer starts in %.1f s", room, delay)
                time.sleep(delay)
            for g in p.grants:
                if self.request_status.get(room) == KVPoll.Failed:
                    break
                if p.direct is not None:  # page to page (one grant: _direct_grant)
                    ret = write_direct(self.engine, g.session, p.direct)
                else:
                    dst = g.region_ptr + p.offset
                    ret = self.engine.transfer_sync(g.session, p.region.ptr, dst, p.nbytes)
                if ret < 0:
                    self._failed_sessions.mark(g.session)
                    raise RuntimeError(f"Mooncake write to {g.session} failed ({ret})")
        except Exception as e:
            if p.region is not None:
                p.region.release()
            self._add_peer_bytes(peer, -p.nbytes)
            logger.error("SpectrumKV: transfer of room %s failed: %s", room, e)
            self._finish_unsent(room, f"SpectrumKV could not send the KV cache: {e}")
            return False
        if p.region is not None:
            p.region.release()
        self._add_peer_bytes(peer, -p.nbytes)
        if self.adaptive is not None:
            seconds = time.perf_counter() - t1
            self.adaptive.observe_write(peer, p.nbytes, seconds, overlapped=not job.final)
        return True

    def _test_delay_s(self, job: PackJob) -> float:
        """The test-only delay before a write (:func:`.faults.test_delay_s`): once per
        request, before the first write of a job that carries its rid (the last chunk's;
        a layer-pipelined request's first layer group)."""
        delay = faults.test_delay_s(job.rid)
        state = self.rooms.get(job.room)
        if delay <= 0 or state is None or state.test_delayed:
            return 0.0
        state.test_delayed = True
        return delay

    def _record_part(self, job: PackJob, p: Packed, transfer_ms: float) -> None:
        room, info = job.room, p.info
        with self.rooms.lock:
            state = self.rooms.get(room)
            if state is None:
                return
            # a layer group's part: its layers follow (the decode writes those only)
            extra = list(job.layers) if job.layers is not None else []
            whole = job.layers is None or job.layers[1] == len(self.k_pools)
            landed = None
            if info.num_tokens:
                state.parts.append([p.offset, p.nbytes, p.checksum, info.num_tokens, *extra])
                landed = (len(state.parts) - 1, list(state.parts[-1]))
                submitted_ms = (job.enqueued - (job.request_start or job.enqueued)) * 1e3
                queue_ms = (p.started - job.enqueued) * 1e3
                state.part_profile.append(
                    [info.num_tokens, round(p.budget, 4), round(submitted_ms, 3)]
                    + [round(queue_ms, 3), round(p.pack_ms, 3), round(transfer_ms, 3), *extra]
                )
            if info.path != "none":
                state.path = info.path
            totals = state.part_totals
            counted = info.tier_counts.items() if whole else ()  # a chunk's tokens: once
            for key, value in (
                ("num_tokens", info.num_tokens if whole else 0),
                ("full_bytes", info.full_nbytes),
                ("sent_bytes", p.nbytes),
                ("pack_ms", p.pack_ms),
                ("transfer_ms", transfer_ms),
                ("register_ms", p.register_ms),
                ("scheduler_ms", job.scheduler_ms),
                ("one_off_regions", int(p.one_off)),
                ("budget_x_full", p.budget * info.full_nbytes),
                *((f"tier_{k}", v) for k, v in counted if k != "drop"),
            ):
                totals[key] = totals.get(key, 0) + value
            if job.final:
                ready_at = state.ready_at
                parts = [list(x) for x in state.parts]
                profile = [list(x) for x in state.part_profile]
                totals = dict(totals)
        if not job.final:
            for g in p.grants if landed is not None else ():  # the decode may unpack it now
                self._send_quietly(g.endpoint, g.port, messages.Landed(room, g.generation, *landed))
            return
        start = job.request_start or job.enqueued
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
            "budget": self.options.budget if not self.options.adaptive else "auto",
            "chosen_budget_mean": round(totals["budget_x_full"] / max(totals["full_bytes"], 1), 4),
            "key_scales": self.options.key_scales,
            "path": state.path or info.path,
            "parts": len(parts),
            "layer_group": self.layer_group if any(len(x) > 4 for x in parts) else 0,
            # the scheduler thread's time on this request's sends (every part's)
            "scheduler_ms": round(totals["scheduler_ms"], 3),
            "queue_ms": round((p.started - job.enqueued) * 1e3, 3),
            # pack/transfer: every part; last_*: the final part, after the last chunk
            "pack_ms": round(totals["pack_ms"], 3),
            "transfer_ms": round(totals["transfer_ms"], 3),
            "last_pack_ms": round(p.pack_ms, 3),
            "last_transfer_ms": round(transfer_ms, 3),
            "pack_timings_ms": info.timings_ms,
            # per part: tokens, budget, submitted ms after the request arrived, queue ms,
            # pack ms, write ms (the timeline of a request sent in parts)
            "part_profile": profile,
            # the request's clock: its sender's creation (Unix ms), then ms after it when
            # every grant was there and when Sent went out (part_profile: the parts)
            "created_unix_ms": unix_ms(start),
            "timeline_ms": {
                "ready": since_ms(start, ready_at),
                "sent": since_ms(start, time.perf_counter()),
            },
            "one_off_regions": int(totals["one_off_regions"]),
            "register_ms": round(totals["register_ms"], 3),
            "fault": p.fault,
        }
        for g in p.grants:
            self._send_quietly(
                g.endpoint,
                g.port,
                messages.Sent(
                    room, g.generation, stats["sent_bytes"], p.checksum, job.aux, stats, parts
                ),
            )
        if self._room_alive(room):
            self.update_status(room, KVPoll.Success)
        if self.metrics is not None:
            self.metrics.observe_sent(stats)
        write_stats(stats)
        logger.debug("SpectrumKV room %s sent: %s", room, stats)
