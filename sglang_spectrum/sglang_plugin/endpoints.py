"""The ``spectrum`` sender, receiver and bootstrap server on SGLang's ``Common*`` classes.

Sender (prefill): SGLang's ``CommonKVSender`` lifecycle (0.5.17 gets 0.5.23's
through :class:`.compat.SenderLifecycle`); the chunks go to the manager's
``add_transfer_request`` (:mod:`.prefill_intake`).

Receiver (decode): ``send_metadata`` reserves a receive region in the
registered arena (capacity from the tokens it asks for and the prefill's
codec) and grants it to the prefill ranks; a full arena defers the grant
(back-pressure: the manager retries it when regions are freed, oldest first,
and fails it after SGLang's waiting timeout, ``SGLANG_DISAGGREGATION_WAITING_TIMEOUT``).
The manager's control thread unpacks each part when the prefill reports it written
(``Landed``; ``--spectrum-unpack arrival``) and what is left when ``Sent`` arrives;
``poll`` only reads the status. The region's life is :class:`.rooms.ReceiveState`: a receiver
that fails on the decode side after its grant (abort, timeout, a lost prefill)
tells the prefill and keeps the region until the prefill acknowledges that
nothing more can be written into it.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.common.conn import (
    CommonKVBootstrapServer,
    CommonKVReceiver,
    CommonKVSender,
)

from sglang_spectrum.policy import TIER_NAMES

from . import compat, messages
from .identity import wire_identity
from .manager import SpectrumKVManager, expand_pages
from .metrics import since_ms, unix_ms, write_stats
from .rooms import ReceiveState, new_generation

logger = logging.getLogger(__name__)


class SpectrumKVSender(compat.SenderLifecycle, CommonKVSender):
    """SGLang's ``CommonKVSender`` lifecycle: ``send`` hands each chunk to the manager's
    ``add_transfer_request`` (:mod:`.prefill_intake`), ``poll`` reads the manager's
    status with SGLang's bootstrap timeout, ``failure_exception`` raises SGLang's
    error. Here only what the room state machine must hear of."""

    kv_mgr: SpectrumKVManager

    def __init__(self, *args: Any, **kwargs: Any):
        self.created = time.perf_counter()  # the adaptive budget's SLO clock
        self._sent_bytes = 0  # packed bytes written, kept at clear() for the metric
        super().__init__(*args, **kwargs)
        self.kv_mgr.open_room(self.bootstrap_room, self)

    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        super().init(num_kv_indices, aux_index)
        compat.start_bootstrap_clock(self)

    def _check_bootstrap_timeout(self) -> Any:
        status = super()._check_bootstrap_timeout()
        if status == KVPoll.Failed:  # tell a decode rank that granted meanwhile
            room = self.bootstrap_room
            self.kv_mgr.fail_room(room, self.kv_mgr.failure_records.get(room, "timed out"))
        return status

    def get_transfer_metric(self) -> Any:
        """SGLang's transfer metric (``sglang:kv_transfer_total_mb`` / ``_speed_gb_s``)
        with the bytes that crossed the wire, the packed parts, instead of Common's
        count: the 16-bit bytes of every page the request covers."""
        metric = super().get_transfer_metric()
        sent = self._sent_bytes or self.kv_mgr.room_sent_bytes(self.bootstrap_room)
        if sent:
            metric.transfer_total_bytes = sent
        return metric

    def clear(self) -> None:
        # SGLang clears a sender before it reads the transfer metric: keep the count
        self._sent_bytes = self.kv_mgr.room_sent_bytes(self.bootstrap_room)
        super().clear()
        self.kv_mgr.forget_room(self.bootstrap_room)

    def abort(self) -> None:
        super().abort()
        self.kv_mgr.sender_aborted(self.bootstrap_room, "Aborted by AbortReq.")


class SpectrumKVReceiver(compat.ReceiverLifecycle, CommonKVReceiver):
    kv_mgr: SpectrumKVManager

    def __init__(self, *args: Any, **kwargs: Any):
        self.state = ReceiveState(new_generation())
        self._pages: np.ndarray | None = None
        self._slots: np.ndarray | None = None  # the pages' pool slots (_pool_slots)
        self._aux_index: int | None = None
        self._prefix_len = 0
        self._need = 0
        self._deferred_logged = False
        self._landed: list[tuple[list[int], Any]] = []  # parts unpacked on landing, in order
        self._landed_first = 0  # tokens those parts finished (the next chunk's first slot)
        self._landed_ms = 0.0
        # perf_counter marks of this request's timeline (the decode's stats line)
        self._marks: dict[str, float] = {"created": time.perf_counter()}
        self._stats: dict[str, Any] | None = None  # written when SGLang polls Success
        super().__init__(*args, **kwargs)
        # a deferred grant waits as long as SGLang lets a request wait for its KV
        wait = getattr(self.kv_mgr, "waiting_timeout", None)
        if wait:
            self.state.defer_timeout_s = float(wait)
        self.kv_mgr.register_receiver(self)

    # -- bootstrap

    def init(self, prefill_dp_rank: int) -> None:
        super().init(prefill_dp_rank)
        if self.conclude_state == KVPoll.Failed:
            return
        reason = self.kv_mgr.prefill_verdict(self.bootstrap_addr)
        if reason:  # tell the prefill too, so it frees the request now, not at a timeout
            self._fail(reason, notify_prefill=True)
        elif self.kv_mgr.request_status.get(self.bootstrap_room) == KVPoll.Bootstrapping:
            self.kv_mgr.update_status(self.bootstrap_room, KVPoll.WaitingForInput)

    def _register_kv_args(self) -> bool:
        """Introduce this decode rank to each prefill rank (once per connection): SGLang's,
        with the manager's ``build_receiver_registration_message``; nothing to a refused
        prefill (maybe another backend: it could not parse it)."""
        if self.kv_mgr.prefill_verdict(self.bootstrap_addr):
            return True
        return super()._register_kv_args()

    def _fail(self, reason: str, notify_prefill: bool = False) -> int:
        """Fail on the decode side: record, conclude, and (after a grant, or when asked)
        tell the prefill, keeping the region until it acknowledges."""
        mgr = self.kv_mgr
        if mgr.request_status.get(self.bootstrap_room) is not None:
            mgr.record_failure(self.bootstrap_room, reason)
            mgr.update_status(self.bootstrap_room, KVPoll.Failed)
        self.conclude_state = KVPoll.Failed
        if mgr.metrics is not None:
            mgr.metrics.observe_failure()
        if notify_prefill:  # a prefill of another backend gets SGLang's own ABORT
            self._send_abort_notification(reason=reason)
        else:
            self._abort_transfer(reason)
        return KVPoll.Failed

    # -- receive region

    def send_metadata(
        self,
        kv_indices: npt.NDArray[np.int32],
        aux_index: int | None = None,
        state_indices: list | None = None,
        decode_prefix_len: int | None = None,
        destination: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.conclude_state is not None:
            return
        if getattr(self, "bootstrap_infos", None) is None:
            self._fail(f"could not fetch the prefill's parallel info from {self.bootstrap_addr}")
            return
        if not compat.is_device_destination(destination):
            self._fail("SpectrumKV receives into the device KV pool only (no host destinations)")
            return
        mgr = self.kv_mgr
        if mgr.arena is None or mgr.layout is None:
            self._fail("SpectrumKV decode has no receive arena (KV pool not attached)")
            return
        self._pages = np.asarray(kv_indices, dtype=np.int64).reshape(-1).copy()
        self._aux_index = aux_index
        # SGLang's send_metadata sends the grant, once the region is reserved
        more = {k: v for k, v in kwargs.items() if v is not None}
        if destination is not None:
            more["destination"] = destination
        self._metadata = ((kv_indices, aux_index, state_indices, decode_prefix_len), more)
        self._prefix_len = int(decode_prefix_len or 0)
        tokens = max(1, len(self._pages) * int(mgr.layout["page_size"]))
        try:
            self._need = mgr.receive_bound(self.bootstrap_addr, tokens)
        except Exception as e:  # never raise on the scheduler loop
            self._fail(f"SpectrumKV: cannot size the receive buffer: {e}", notify_prefill=True)
            return
        if self._need > mgr.arena.size:
            self._fail(
                f"SpectrumKV: request {self.bootstrap_room} needs a {self._need}-byte receive"
                f" buffer but the decode receive arena has {mgr.arena.size} bytes; raise"
                " --spectrum-arena-mb on the decode server",
                notify_prefill=True,
            )
            return
        if self.retry_grant() == "deferred":
            mgr.defer(self)

    def retry_grant(self) -> str:
        """Reserve the region and grant it (scheduler or control thread): "granted",
        "deferred" (arena full), "failed" or "concluded"."""
        mgr = self.kv_mgr
        outcome = self.state.reserve(lambda: mgr.arena.alloc(self._need))
        if outcome == "deferred":
            if not self._deferred_logged:
                self._deferred_logged = True
                logger.info(
                    "SpectrumKV: receive arena full (%d of %d bytes in use): request %s"
                    " (%d bytes) waits for a free region",
                    mgr.arena.in_use,
                    mgr.arena.size,
                    self.bootstrap_room,
                    self._need,
                )
            return outcome
        if outcome == "expired":
            self._fail(
                f"SpectrumKV: request {self.bootstrap_room} waited"
                f" {self.state.defer_timeout_s:.0f} s for {self._need} bytes of the decode"
                f" receive arena ({mgr.arena.size} bytes, {mgr.arena.in_use} in use); raise"
                " --spectrum-arena-mb on the decode server",
                notify_prefill=True,
            )
            return "failed"
        if outcome != "granted":
            return outcome
        direct = self._direct_offer()
        self.state.direct = bool(direct)
        grant = messages.Grant(
            room=self.bootstrap_room,
            generation=self.state.generation,
            session=mgr.session_id,
            endpoint=mgr.local_ip,
            port=int(mgr.rank_port),
            region_ptr=self.state.region.ptr,
            capacity=self._need,
            num_pages=len(self._pages),
            prefix_len=self._prefix_len,
            aux_index=-1 if self._aux_index is None else int(self._aux_index),
            required=int(getattr(self, "required_dst_info_num", 1) or 1),
            identity=mgr.identity(),
            prefill_instance=mgr.prefill_instance(self.bootstrap_addr),
            **direct,
        )
        args, more = self._metadata
        with mgr.publish_grant(grant):  # one Grant per prefill rank, init_time set
            super().send_metadata(*args, **more)
        if self.conclude_state == KVPoll.Failed:  # a prefill rank could not be reached
            self._fail(mgr.failure_records.get(self.bootstrap_room, "grant not delivered"))
            return "failed"
        self._marks.setdefault("granted", time.perf_counter())
        return "granted"

    def _direct_offer(self) -> dict[str, Any]:
        """The ``Grant`` fields that let the prefill write lossless parts straight into
        this request's pool pages (:mod:`.direct`); none without a registered pool."""
        mem = self.kv_mgr.pool_memory
        if mem is None:
            return {}
        return {
            "pool_ptrs": list(mem.ptrs),
            "slot_bytes": mem.slot_bytes,
            "pool_dtype": mem.dtype,
            "pages": self._pages.astype("<i8").tobytes(),
            "page_size": int(self.kv_mgr.layout["page_size"]),
        }

    # -- completion (manager control thread)

    def on_landed(self, landed: messages.Landed) -> None:
        """One part is written (``--spectrum-unpack arrival``): unpack it now, while the
        prefill computes and sends the later ones. Parts land in ``Sent.parts`` order; one
        out of that order is left for ``Sent``. A rejected part fails the request; the
        region stays reserved until the prefill acknowledges (it may still be writing)."""
        mgr = self.kv_mgr
        if mgr.options.unpack != "arrival" or landed.index != len(self._landed):
            return
        t0 = time.perf_counter()
        self._marks.setdefault("first_landed", t0)
        try:
            part = [int(x) for x in landed.part]
            info = self._unpack_part(
                part, self._landed_first, self._pool_slots(), landed.generation
            )
        except Exception as e:
            self._fail(self._rejected(e))
            return
        if info is _ABORTED:
            return
        self._landed.append((part, info))
        if _part_layers(part, len(mgr.k_pools))[1] == len(mgr.k_pools):
            self._landed_first += part[3]
        self._landed_ms += (time.perf_counter() - t0) * 1e3

    def _pool_slots(self) -> np.ndarray:
        """int64 ``[pages x page_size]``: the pool slots of the granted pages, expanded
        once for every part (control thread)."""
        if self._slots is None:
            self._slots = expand_pages(self._pages, int(self.kv_mgr.layout["page_size"]))
        return self._slots

    def _rejected(self, e: Exception) -> str:
        reason = (
            f"SpectrumKV: packed KV of request {self.bootstrap_room} rejected:"
            f" {type(e).__name__}: {e}"
        )
        logger.error(reason)
        return reason

    def _unpack_part(self, part: list[int], first: int, slots: np.ndarray, generation: int) -> Any:
        """Validate one part (``[offset, bytes, checksum, tokens(, l0, l1)]``) and unpack
        it into ``slots[first:first + tokens]`` of its layers, the state lock held (an
        abort waits for at most one part): its unpack info, None for a part the prefill
        wrote straight into the pool pages, or ``_ABORTED``."""
        mgr = self.kv_mgr
        num_layers = len(mgr.k_pools)
        l0, l1 = _part_layers(part, num_layers)
        offset, nbytes, checksum, tokens = part[:4]
        with self.state.lock:
            region = self.state.begin_unpack(generation)
            if region is None:
                return _ABORTED  # aborted meanwhile: the slots may belong to another request
            if offset == messages.DIRECT_OFFSET and self.state.direct:
                return None  # already in the pool pages: nothing to unpack
            if not (0 <= offset and 0 < nbytes and offset + nbytes <= region.capacity):
                raise ValueError(f"part of {nbytes} bytes at {offset} outside the receive buffer")
            if not (0 < tokens and first + tokens <= len(slots)):
                raise ValueError(
                    f"part of {tokens} tokens from token {first} for {len(slots)} slots"
                )
            buf = region.view(offset + nbytes)[offset:]
            dst = slots[first : first + tokens]
            return mgr.unpack_into_pool(
                buf, dst, checksum, (l0, l1) if (l0, l1) != (0, num_layers) else None
            )

    def on_sent(self, sent: messages.Sent) -> None:
        """Validate and unpack every part of the packed KV not unpacked on landing, write
        the metadata row, report success."""
        mgr = self.kv_mgr
        t0 = self._marks["sent"] = time.perf_counter()
        infos: list[Any] = []
        parts: list[list[int]] = []
        try:
            parts = [[int(x) for x in p] for p in sent.parts]
            page_size = int(mgr.layout["page_size"])
            slots = self._pool_slots()
            num_layers = len(mgr.k_pools)
            layers = [_part_layers(p, num_layers) for p in parts]
            # a chunk sent in layer groups: its tokens count once, at its last group
            n = sum(p[3] for p, ls in zip(parts, layers) if ls[1] == num_layers)
            if not (len(self._pages) - 1) * page_size < n <= len(slots):
                raise ValueError(
                    f"the prefill sent {n} tokens for {len(self._pages)} pages of {page_size}"
                )
            first = direct = landed = 0
            whole: list[Any] = []  # what unpacked the last layers of each chunk (its tiers)
            for i, (part, (_, l1)) in enumerate(zip(parts, layers)):
                if i < len(self._landed) and self._landed[i][0] == part:
                    info, landed = self._landed[i][1], landed + 1  # unpacked on landing
                else:
                    info = self._unpack_part(part, first, slots, sent.generation)
                if info is _ABORTED:
                    return
                if info is None:
                    direct += part[3]
                    first += part[3]
                    continue
                infos.append(info)
                if l1 == num_layers:
                    whole.append(info)
                    first += part[3]
            dropped = sum(len(info.dropped) for info in infos)
            if dropped:
                raise ValueError(f"{dropped} dropped tokens (serving never drops)")
            if self._aux_index is not None and sent.aux:
                mgr.write_aux(self._aux_index, sent.aux)
        except Exception as e:
            reason = self._rejected(e)
            self._release(self.state.finish(ok=False))  # the prefill is done writing
            self._fail(reason)
            return
        self._marks["ready"] = time.perf_counter()
        unpack_ms = (self._marks["ready"] - t0) * 1e3
        self._release(self.state.finish(ok=True))
        stats = {
            "role": "decode",
            "rid": sent.stats.get("rid", ""),
            "room": self.bootstrap_room,
            "tp_rank": int(mgr.attn_tp_rank),
            "num_tokens": n,
            "prefix_tokens": self._prefix_len,
            "full_bytes": sum(int(info.layout.full_nbytes) for info in infos)
            + direct * mgr.full_bytes_per_token(),
            "direct_tokens": direct,
            "received_bytes": int(sent.nbytes),
            "parts": len(parts),
            "parts_on_arrival": landed,
            "tiers": {  # (no parts: the decode held the whole prompt; direct: top tier)
                k: sum(info.tier_counts.get(k, 0) for info in whole)
                + (direct if k == TIER_NAMES[0] else 0)
                for k in TIER_NAMES
                if k != "drop"
            },
            "unpack_ms": round(unpack_ms, 3),  # after Sent: what delays the first token
            "arrival_unpack_ms": round(self._landed_ms, 3),  # earlier, as the parts landed
            "prefill": sent.stats,
        }
        if mgr.metrics is not None:
            mgr.metrics.observe_received(stats)
        self._stats = stats  # completed and written when SGLang polls Success
        if mgr.request_status.get(self.bootstrap_room) is not None:
            mgr.update_status(self.bootstrap_room, KVPoll.Success)

    def on_failed(self, reason: str) -> None:
        """The prefill gave the request up; it writes nothing after ``Failed``."""
        self._release(self.state.finish(ok=False))
        if self.conclude_state is None:
            self._fail(reason)
        self._maybe_unregister()

    def on_abort_ack(self, generation: int) -> None:
        """The prefill will not write into the region any more: free it."""
        self._release(self.state.on_abort_ack(generation))
        self._maybe_unregister()

    def expire_abort(self) -> None:
        """Free the region of an abort the prefill did not acknowledge in time."""
        region = self.state.expire()
        if region is not None:
            logger.warning(
                "SpectrumKV: no abort ack for room %s in %.0f s; region freed",
                self.bootstrap_room,
                self.state.ack_timeout_s,
            )
            self._release(region)
        self._maybe_unregister()

    def _release(self, region: Any) -> None:
        if region is not None:
            region.release()
            self.kv_mgr.retry_deferred()

    def _maybe_unregister(self) -> None:
        if self.state.cleared and not self.state.holds_region:
            self.kv_mgr.unregister_receiver(self)

    # -- scheduler-side API

    def poll(self) -> int:
        status = self._poll()
        if status == KVPoll.Failed and self.state.pages_may_be_written:
            # a direct write may still land in this request's pages: SGLang frees them
            # when it sees Failed, so report it once the prefill can write no more
            # (its Sent, Failed or AbortAck; the ack's timeout for a dead prefill)
            return KVPoll.Transferring
        return status

    def _poll(self) -> int:
        if self.conclude_state is not None:
            return self.conclude_state
        status = self.kv_mgr.request_status.get(self.bootstrap_room, KVPoll.Failed)
        if status == KVPoll.Failed:  # failed meanwhile (prefill, heartbeat, timeout)
            self.conclude_state = status
            self._abort_transfer(self.kv_mgr.failure_records.get(self.bootstrap_room, ""))
            return status
        if self.state.phase == "deferred":
            return KVPoll.WaitingForInput  # back-pressure: the manager retries the grant
        if status == KVPoll.Success:
            self.conclude_state = status
            self._marks["polled"] = time.perf_counter()
            self._write_stats()
            return status
        if self.state.phase == "granted":
            timeout = self._check_waiting_timeout()
            if timeout is not None:
                self.conclude_state = KVPoll.Failed
                self._abort_transfer("timed out waiting for the KV cache")
                return timeout
        return status

    def _write_stats(self) -> None:
        """The decode's stats line, with the request's timeline: the receiver's creation
        (Unix ms), then ms after it when the grant went out, the first part landed,
        ``Sent`` came, the KV was in the pool and SGLang's poll saw it (the request then
        waits for the decode's next forward, its first token)."""
        stats, self._stats = self._stats, None
        if stats is None:
            return
        created = self._marks["created"]
        stats["created_unix_ms"] = unix_ms(created)
        stats["timeline_ms"] = {
            k: since_ms(created, self._marks.get(k))
            for k in ("granted", "first_landed", "sent", "ready", "polled")
        }
        write_stats(stats)

    def _abort_transfer(self, reason: str = "", notify_prefill: bool = False) -> None:
        """Tell the prefill ranks that this receiver gave up. A granted region stays
        reserved until they acknowledge (or the ack times out)."""
        mgr = self.kv_mgr
        mgr.unregister_deferred(self)
        send_abort, _ = self.state.fail_local()
        if not (send_abort or notify_prefill):
            return
        msg = messages.Abort(
            self.bootstrap_room, self.state.generation, mgr.local_ip, int(mgr.rank_port), reason
        )
        for info in getattr(self, "bootstrap_infos", None) or []:
            try:
                sock, lock = self._connect_to_bootstrap_server(info)
                with lock:
                    sock.send_multipart(messages.encode(msg))
            except Exception as e:
                logger.debug("SpectrumKV: abort notification failed: %s", e)

    def _send_abort_notification(self, *args: Any, reason: str = "", **kwargs: Any) -> None:
        """Tell the prefill ranks (SGLang calls this on abort and waiting timeout)."""
        mgr = self.kv_mgr
        if mgr.prefill_is_foreign(self.bootstrap_addr):  # another backend: SGLang's ABORT
            notify = functools.partial(super()._send_abort_notification, *args, **kwargs)
            notify()
            # its prefill drops an ABORT for a request it has not seen yet (the router
            # sends the request to both servers at once): repeat it for a few seconds
            mgr.repeat_foreign_abort(notify)
            return
        self._abort_transfer(reason, notify_prefill=True)

    def abort(self) -> None:
        if self.conclude_state != KVPoll.Failed:
            if self.kv_mgr.request_status.get(self.bootstrap_room) is not None:
                self.kv_mgr.record_failure(self.bootstrap_room, "Aborted by AbortReq.")
                self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)
            self.conclude_state = KVPoll.Failed
        self._send_abort_notification()
        self.abort_notified = True

    def is_abort_release_safe(self) -> bool:
        return True  # nothing is written into the KV pages after an abort (see on_sent)

    def clear(self) -> None:
        if self.state.holds_region and self.state.phase == "granted":
            self._abort_transfer("cleared before the transfer ended")  # keep it until the ack
        super().clear()
        self.state.cleared = True
        self.kv_mgr.unregister_deferred(self)
        self._maybe_unregister()


_ABORTED = object()  # _unpack_part: the receiver was aborted meanwhile


def _part_layers(part: list[int], num_layers: int) -> tuple[int, int]:
    """The layers ``[l0, l1)`` a ``Sent`` part holds: ``[offset, bytes, checksum, tokens]``
    every layer, ``[..., l0, l1]`` a layer group's (``--spectrum-layer-group``)."""
    if len(part) == 4:
        return 0, num_layers
    if len(part) != 6 or not 0 <= int(part[4]) < int(part[5]) <= num_layers:
        raise ValueError(f"malformed part {part[:6]} for {num_layers} layers")
    return int(part[4]), int(part[5])


class SpectrumKVBootstrapServer(CommonKVBootstrapServer):
    """SGLang's bootstrap server + ``PUT /spectrum/register`` and ``GET /spectrum/info``.

    Ranks are keyed like SGLang's own ``/route`` table: by DP group (the attention
    DP rank, or the system DP rank with several DP schedulers) and attention-TP rank.
    ``instance`` (random, per start) lets a decode notice that this prefill restarted.
    """

    def __init__(self, host: str, port: int, *args: Any, **kwargs: Any):
        self.spectrum_ranks: dict[str, dict[str, Any]] = {}
        self.spectrum_instance = f"{new_generation():016x}"
        super().__init__(host, port, *args, **kwargs)

    def _setup_routes(self) -> None:
        super()._setup_routes()
        self.app.router.add_put("/spectrum/register", self._handle_spectrum_register)
        self.app.router.add_get("/spectrum/info", self._handle_spectrum_info)

    async def _handle_spectrum_register(self, request):
        from aiohttp import web

        data = await request.json()
        system_dp = int(data.get("system_dp_size") or 1)
        group = data.get("attn_dp_rank") if system_dp == 1 else data.get("system_dp_rank")
        key = f"{group}/{data.get('attn_tp_rank')}"
        async with self.lock:
            self.spectrum_ranks[key] = data
        return web.json_response({"instance": self.spectrum_instance}, status=200)

    async def _handle_spectrum_info(self, request):
        from aiohttp import web

        async with self.lock:
            ranks = list(self.spectrum_ranks.values())
        if not ranks:
            return web.Response(text="No SpectrumKV prefill rank registered yet.", status=503)
        server = wire_identity(instance=self.spectrum_instance)
        return web.json_response({"server": server, "ranks": ranks}, status=200)
