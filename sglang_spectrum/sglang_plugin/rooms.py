"""Per-request state machines of the ``spectrum`` backend (SGLang-free, torch-free).

Prefill: :class:`PrefillRooms`, the table of rooms a prefill rank knows: the
decode grants, the job parked until every grant is there, the transfer jobs in
flight, the decode's abort and who to acknowledge it to. Decode:
:class:`ReceiveState`, one request's receive region from reservation to release.
The backend (:mod:`.prefill_side`, :mod:`.endpoints`) drives both; the tests
drive them with a fake peer, racing aborts, sends and clears.

Rules that keep the tables bounded and nothing written into memory that
belongs to someone else:

* A room leaves :class:`PrefillRooms` when the scheduler cleared its sender and
  no job of it is in flight (the last one out deletes it), or, when no sender
  ever appeared (the request never reached this prefill), after ``orphan_ttl_s``.
* A cleared room leaves a tombstone per grant ``(room, decode session,
  generation)`` for ``tombstone_ttl_s``: a late ``Grant`` of that receiver is
  dropped, a late ``Abort`` acknowledged at once; neither re-creates state.
  SGLang may reuse a room (PD re-bootstrap): the new receiver's generation differs.
* An ``Abort`` is acknowledged only once no job of the room is in flight: after
  the ack the decode reuses the region.
* Decode: the region is released when the prefill promised no more writes
  (``Sent`` unpacked, ``Failed``, ``AbortAck`` of this generation), when nothing
  was ever granted, or after ``ack_timeout_s`` without an ack (a dead prefill).
  With direct writes offered, the request's pool pages are held as long as the
  region (the receiver reports its failure to SGLang, which frees them, only then).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ORPHAN_TTL_S = 330.0  # > SGLang's bootstrap timeout (300 s): the sender fails first
ABORTED_SENDER_TTL_S = 60.0  # an aborted sender SGLang never cleared is cleared after this
TOMBSTONE_TTL_S = 600.0
ABORT_ACK_TIMEOUT_S = 60.0  # decode: keep an aborted region at most this long without ack
GRANT_DEFER_TIMEOUT_S = 300.0  # decode: fail a grant waiting longer for the arena (default;
# the receiver uses SGLang's waiting timeout, SGLANG_DISAGGREGATION_WAITING_TIMEOUT)


def new_generation() -> int:
    """A random 63-bit receiver generation (never 0)."""
    return secrets.randbits(63) | 1


@dataclass(frozen=True)
class AckTarget:
    """Where to send an ``AbortAck`` and for which receiver generation."""

    endpoint: str
    port: int
    generation: int


@dataclass
class PrefillRoom:
    """Prefill-side state of one room: the decode grants and the transfer's progress."""

    created: float
    grants: dict[str, Any] = field(default_factory=dict)  # decode session -> Grant
    required: int = 1
    prefix_len: int = 0  # tokens the decode already holds (SGLang pops its own copy)
    has_sender: bool = False  # the scheduler created this room's sender
    job: Any = None  # the last chunk's job, parked until every grant is there
    in_flight: int = 0  # jobs handed to the transfer workers and not finished
    aborted: bool = False  # decode aborted: ack once nothing is in flight any more
    ack_targets: list[AckTarget] = field(default_factory=list)
    cleared: bool = False  # the sender is gone: delete once nothing is in flight
    failed: str = ""  # why the prefill gave the room up ('' = it did not)
    told: set[str] = field(default_factory=set)  # decode sessions told that reason
    next_offset: int = 0  # where the next part goes in the decode's region
    sent_tokens: int = 0  # tokens of the parts packed (or written directly) so far
    sender_aborted_at: float | None = None  # the scheduler aborted the sender (clock)
    reserved: int = 0  # bytes the accepted earlier parts may take (bounds, aligned)
    parts: list[list[int]] = field(default_factory=list)  # written: offset, bytes, sum, tokens
    part_totals: dict[str, float] = field(default_factory=dict)  # their stats, summed
    # per part: tokens, budget, submitted (ms after the request arrived), queue, pack, write
    part_profile: list[list[float]] = field(default_factory=list)
    peer_key: tuple[str, ...] = ()  # decode sessions of the grants (the worker's key)
    # layer groups: (codec config, transfer.ChunkTiers) its current chunk's first group chose
    group_plan: Any = None
    path: str = ""  # how its last part with tokens was packed (stats)
    test_delayed: bool = False  # the test-only transfer delay was served (faults.py)
    ready_at: float = 0.0  # perf_counter when every grant and the sender were there

    @property
    def complete(self) -> bool:
        return len(self.grants) >= self.required

    @property
    def live(self) -> bool:
        """Jobs of this room may still be packed and written."""
        return not (self.aborted or self.cleared or self.failed)


class PrefillRooms:
    """The prefill rank's rooms (thread-safe; see the module docstring)."""

    def __init__(
        self,
        orphan_ttl_s: float = ORPHAN_TTL_S,
        tombstone_ttl_s: float = TOMBSTONE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.lock = threading.RLock()
        self._rooms: dict[int, PrefillRoom] = {}
        self._tombstones: dict[tuple[int, str, int], float] = {}
        self.orphan_ttl_s = orphan_ttl_s
        self.tombstone_ttl_s = tombstone_ttl_s
        self.clock = clock

    # -- lookups

    def get(self, room: int) -> PrefillRoom | None:
        with self.lock:
            return self._rooms.get(room)

    def sizes(self) -> dict[str, int]:
        with self.lock:
            return {"rooms": len(self._rooms), "tombstones": len(self._tombstones)}

    def _state(self, room: int) -> PrefillRoom:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = PrefillRoom(created=self.clock())
        return state

    # -- scheduler side

    def open(self, room: int) -> PrefillRoom | None:
        """The scheduler created this room's sender: the room's state when every decode
        rank granted already (the caller marks the room ready), else None. Atomic with
        :meth:`grant`: exactly one of the two sees both the sender and the grants."""
        with self.lock:
            state = self._state(room)
            state.has_sender = True
            return state if state.complete and state.live else None

    def park_or_take(self, room: int, job: Any) -> bool:
        """The last chunk's job: True when every grant is there (the caller enqueues it,
        counted in flight), False when it is parked (or the room was aborted/cleared)."""
        with self.lock:
            state = self._rooms.get(room)
            if state is None or not state.live:
                return False
            if not state.complete:
                state.job = job
                return False
            state.in_flight += 1
            return True

    def clear(self, room: int) -> None:
        """The scheduler cleared the sender: tombstone its grants; delete the room now,
        or when its last job leaves the flight."""
        with self.lock:
            state = self._rooms.get(room)
            if state is None:
                return
            expiry = self.clock() + self.tombstone_ttl_s
            for session, grant in state.grants.items():
                self._tombstones[(room, session, int(grant.generation))] = expiry
            state.job = None
            if state.in_flight:
                state.cleared = True
            else:
                del self._rooms[room]

    def sender_aborted(self, room: int) -> None:
        """The scheduler aborted this room's sender. SGLang clears an aborted sender only
        on some paths (a request aborted mid-prefill is released without ``clear()``):
        :meth:`stale_aborted` names the ones still here later."""
        with self.lock:
            state = self._rooms.get(room)
            if state is not None and state.sender_aborted_at is None:
                state.sender_aborted_at = self.clock()

    def stale_aborted(self, ttl_s: float = ABORTED_SENDER_TTL_S) -> list[int]:
        """Rooms whose sender was aborted over ``ttl_s`` ago, not cleared and with nothing
        in flight (the caller clears them and SGLang's entries for them)."""
        now = self.clock()
        with self.lock:
            return [
                room
                for room, s in self._rooms.items()
                if s.sender_aborted_at is not None
                and now - s.sender_aborted_at > ttl_s
                and not s.in_flight
            ]

    # -- decode messages

    def grant(self, g: Any) -> tuple[str, Any]:
        """Record a ``Grant``: ("stale", None) for a cleared receiver (drop it),
        ("failed", grants to tell the failure now) when the prefill gave the room up
        already, ("pending", None) while other decode ranks have not granted or the
        sender does not exist yet (:meth:`open` then reports the room ready),
        ("complete", parked job or None) once all have and the sender exists (a
        returned job is counted in flight)."""
        with self.lock:
            if (g.room, g.session, int(g.generation)) in self._tombstones:
                return "stale", None
            state = self._state(g.room)
            if state.aborted or state.cleared:
                return "stale", None

            state.grants[g.session] = g
            state.required = max(1, int(g.required))
            state.prefix_len = int(g.prefix_len)
            state.peer_key = tuple(sorted(state.grants))
            if state.failed:
                return "failed", self._failure_due(state)
            if not state.complete or not state.has_sender:
                return "pending", None
            job, state.job = state.job, None
            if job is not None:
                state.in_flight += 1
            return "complete", job

    def abort(self, room: int, target: AckTarget) -> list[AckTarget]:
        """Record an ``Abort``; returns the targets to acknowledge now (nothing in
        flight), [] when the last job in flight will."""
        with self.lock:
            state = self._rooms.get(room)
            if state is None:
                if self._tombstoned(room, target.generation):
                    return [target]  # cleared with nothing in flight: nothing to wait for
                # never seen: a sender created later finds it aborted (an orphan entry,
                # dropped after orphan_ttl_s)
                state = self._state(room)
            state.aborted = True
            state.job = None
            state.ack_targets.append(target)
            if state.in_flight:
                return []
            targets, state.ack_targets = state.ack_targets, []
            if state.cleared:
                del self._rooms[room]
            return targets

    def _tombstoned(self, room: int, generation: int) -> bool:
        """A grant of ``room`` by the receiver of ``generation`` was cleared (lock held;
        a scan: late aborts are rare and tombstones expire)."""
        return any(r == room and g == int(generation) for r, _, g in self._tombstones)

    # -- transfer workers

    def enter_flight(self, room: int) -> bool:
        """Count one more job of ``room`` in flight (False: aborted or gone)."""
        with self.lock:
            state = self._rooms.get(room)
            if state is None or not state.live:
                return False
            state.in_flight += 1
            return True

    def fail(self, room: int, reason: str) -> list[Any]:
        """The prefill gives ``room`` up: the grants to tell ``reason`` now (nothing in
        flight, not told yet, not aborted by the decode), else [] (the last job out
        tells them, see :meth:`leave_flight`)."""
        with self.lock:
            state = self._rooms.get(room)
            if state is None:
                return []
            if not state.failed:
                state.failed = reason
            state.job = None
            return self._failure_due(state)

    @staticmethod
    def _failure_due(state: PrefillRoom) -> list[Any]:
        if state.in_flight or state.aborted or not state.failed:
            return []
        due = [g for s, g in state.grants.items() if s not in state.told]
        state.told.update(g.session for g in due)
        return due

    def leave_flight(self, room: int) -> tuple[list[AckTarget], list[Any], str]:
        """A job of ``room`` is over (no write of it can land any more): (abort acks
        due now, grants to tell the failure now, the failure reason)."""
        with self.lock:
            state = self._rooms.get(room)
            if state is None:
                return [], [], ""
            state.in_flight = max(0, state.in_flight - 1)
            targets: list[AckTarget] = []
            tell: list[Any] = []
            if state.in_flight == 0:
                targets, state.ack_targets = state.ack_targets, []
                tell = self._failure_due(state)
                if state.cleared:
                    del self._rooms[room]
            return targets, tell, state.failed

    # -- housekeeping

    def sweep(self) -> list[int]:
        """Drop expired tombstones and orphan rooms (no sender, nothing in flight,
        older than ``orphan_ttl_s``); returns the orphan rooms dropped."""
        now = self.clock()
        with self.lock:
            for key in [k for k, t in self._tombstones.items() if t <= now]:
                del self._tombstones[key]
            orphans = [
                room
                for room, s in self._rooms.items()
                if not s.has_sender and not s.in_flight and now - s.created > self.orphan_ttl_s
            ]
            for room in orphans:
                del self._rooms[room]
        return orphans


class ReceiveState:
    """Decode-side state of one request's receive region (thread-safe).

    Phases: ``new`` -> ``deferred`` (arena full; fails after ``defer_timeout_s``)
    -> ``granted`` -> ``done`` (unpacked) or ``failed``. ``holds_region`` is True from
    the reservation until the prefill can no longer write (see the module docstring).
    """

    def __init__(
        self,
        generation: int | None = None,
        defer_timeout_s: float = GRANT_DEFER_TIMEOUT_S,
        ack_timeout_s: float = ABORT_ACK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.lock = threading.RLock()
        self.generation = generation or new_generation()
        self.phase = "new"
        self.region: Any = None  # a transport.Region (anything with release())
        self.deferred_since: float | None = None
        self.abort_sent_at: float | None = None  # an Abort is out, no ack yet
        self.cleared = False
        self.direct = False  # the grant offered the pool's pages for direct writes
        self.defer_timeout_s = defer_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.clock = clock

    @property
    def holds_region(self) -> bool:
        return self.region is not None

    @property
    def pages_may_be_written(self) -> bool:
        """A direct write of the prefill may still land in the request's pool pages: they
        must not be freed (the region's lifetime bounds the prefill's writes)."""
        return self.direct and self.region is not None

    @property
    def concluded(self) -> bool:
        return self.phase in ("done", "failed")

    def reserve(self, alloc: Callable[[], Any]) -> str:
        """Try to reserve the region with ``alloc()`` (None = arena full): "granted"
        (the caller sends the grant), "deferred", "expired" (waited longer than
        ``defer_timeout_s``), "held" (granted before: the scheduler's poll and the
        control thread's retry may race) or "concluded" (failed meanwhile)."""
        with self.lock:
            if self.concluded:
                return "concluded"
            if self.region is not None:
                return "held"
            region = alloc()
            if region is None:
                now = self.clock()
                if self.deferred_since is None:
                    self.deferred_since = now
                    self.phase = "deferred"
                if now - self.deferred_since > self.defer_timeout_s:
                    return "expired"
                return "deferred"
            self.region = region
            self.phase = "granted"
            return "granted"

    def begin_unpack(self, generation: int) -> Any:
        """``Sent`` arrived: the region to unpack from, or None (another generation, an
        abort under way, concluded). The caller unpacks while holding :attr:`lock`."""
        if generation != self.generation or self.abort_sent_at is not None:
            return None
        if self.phase != "granted":
            return None
        return self.region

    def finish(self, ok: bool) -> Any:
        """The prefill is done writing (Sent handled, or Failed): conclude and return the
        region to release (or None)."""
        with self.lock:
            if not self.concluded:
                self.phase = "done" if ok else "failed"
            region, self.region = self.region, None
            return region

    def fail_local(self) -> tuple[bool, Any]:
        """A decode-side failure (abort, timeout, refusal): (whether to send an Abort
        and keep the region until the ack, the region to release now or None)."""
        with self.lock:
            if not self.concluded:
                self.phase = "failed"
            if self.abort_sent_at is not None:
                return False, None
            if self.region is None:  # nothing granted: nobody can write
                return False, None
            self.abort_sent_at = self.clock()
            return True, None

    def on_abort_ack(self, generation: int) -> Any:
        """The prefill acknowledged our abort: the region to release (None: not ours)."""
        with self.lock:
            if generation != self.generation:
                return None
            self.abort_sent_at = None
            region, self.region = self.region, None
            return region

    def expire(self) -> Any:
        """The region to release when the abort ack is overdue (a dead prefill), else None."""
        with self.lock:
            sent = self.abort_sent_at
            if sent is None or self.clock() - sent <= self.ack_timeout_s:
                return None
            self.abort_sent_at = None
            region, self.region = self.region, None
            return region

    def defer_expired(self) -> bool:
        with self.lock:
            return (
                self.phase == "deferred"
                and self.deferred_since is not None
                and self.clock() - self.deferred_since > self.defer_timeout_s
            )
