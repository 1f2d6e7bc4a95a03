"""Prefill transfer workers: a two-stage pipeline per decode peer (SGLang-free).

Each decode peer (the decode sessions a room's grants name; one session with
equal TP) gets its own pipeline: a *packer* thread runs ``pack(job)`` in FIFO
order and hands the result to a *writer* thread through a queue of ``depth``
slots, which runs ``write(job, packed)``. So request N+1 is packed while N is on
the wire, the parts of one request stay in order (one packer, one writer per
peer), and a slow or dead decode stalls only its own pipeline: other peers have
their own threads, and the bounded hand-off keeps at most ``depth`` packed
buffers waiting for it.

:class:`FailedSessions` remembers decode sessions whose write failed: jobs for
them fail at once instead of waiting for another timeout, until ``ttl_s``
passes (then one write probes the peer again) or the peer shows it is back.
A pipeline idle for ``idle_s`` stops its threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

FAILED_SESSION_TTL_S = 30.0
PIPELINE_IDLE_S = 120.0


class FailedSessions:
    """Decode sessions whose last write failed, each until ``ttl_s`` after the failure."""

    def __init__(self, ttl_s: float = FAILED_SESSION_TTL_S, clock=time.monotonic):
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.ttl_s = ttl_s
        self.clock = clock

    def mark(self, session: str) -> None:
        with self._lock:
            self._until[session] = self.clock() + self.ttl_s

    def forgive(self, session: str) -> None:
        with self._lock:
            self._until.pop(session, None)

    def failed(self, sessions: Any) -> str | None:
        """The first of ``sessions`` still marked failed, or None (expired marks go)."""
        now = self.clock()
        with self._lock:
            for s in sessions:
                until = self._until.get(s)
                if until is None:
                    continue
                if until > now:
                    return s
                del self._until[s]
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._until)


class _Pipeline:
    def __init__(self, key: tuple, owner: TransferWorkers):
        self.key = key
        self.owner = owner
        self.jobs: queue.Queue = queue.Queue()
        self.packed: queue.Queue = queue.Queue(maxsize=owner.depth)
        self.last_used = time.monotonic()
        self.pending = 0  # jobs submitted and not written (or dropped) yet
        self.alive = True
        name = f"spectrum-{owner.name}-{abs(hash(key)) % 10_000:04d}"
        self.packer = threading.Thread(target=self._pack_loop, name=name + "-pack", daemon=True)
        self.writer = threading.Thread(target=self._write_loop, name=name + "-write", daemon=True)
        self.packer.start()
        self.writer.start()

    def _pack_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                self.packed.put(None)
                return
            try:
                result = self.owner.pack(job)
            except BaseException as e:  # the stages report their own failures: a bug
                logger.exception("SpectrumKV: pack stage crashed: %s", e)
                self.owner.crashed(job, None, e)
                result = None
            if result is None:  # dropped or failed in the pack stage
                self.owner._done(self)
                continue
            self.packed.put((job, result))

    def _write_loop(self) -> None:
        while True:
            item = self.packed.get()
            if item is None:
                return
            try:
                self.owner.write(*item)
            except BaseException as e:
                logger.exception("SpectrumKV: write stage crashed: %s", e)
                self.owner.crashed(*item, e)
            finally:
                self.owner._done(self)


class TransferWorkers:
    """Per-peer pack -> write pipelines (see the module docstring).

    ``pack(job) -> packed | None`` and ``write(job, packed) -> None`` handle their
    own errors (None from ``pack`` drops the job); should one raise anyway,
    ``crashed(job, packed or None, exception)`` cleans up after it. :meth:`submit`
    never blocks.
    """

    def __init__(
        self,
        pack: Callable[[Any], Any],
        write: Callable[[Any, Any], None],
        crashed: Callable[[Any, Any, BaseException], None],
        depth: int = 2,
        idle_s: float = PIPELINE_IDLE_S,
        name: str = "transfer",
    ):
        self.pack = pack
        self.write = write
        self._crashed = crashed
        self.depth = max(1, int(depth))
        self.idle_s = idle_s
        self.name = name
        self._pipelines: dict[tuple, _Pipeline] = {}
        self._lock = threading.Lock()

    def submit(self, key: tuple, job: Any) -> None:
        """Queue ``job`` on the pipeline of peer ``key`` (created on first use)."""
        with self._lock:
            pipe = self._pipelines.get(key)
            if pipe is None or not pipe.alive:
                pipe = self._pipelines[key] = _Pipeline(key, self)
            pipe.pending += 1
            pipe.last_used = time.monotonic()
        pipe.jobs.put(job)

    def crashed(self, job: Any, packed: Any, error: BaseException) -> None:
        try:
            self._crashed(job, packed, error)
        except BaseException:
            logger.exception("SpectrumKV: cleaning up after a crashed job failed")

    def _done(self, pipe: _Pipeline) -> None:
        with self._lock:
            pipe.pending -= 1
            pipe.last_used = time.monotonic()

    def reap_idle(self) -> int:
        """Stop the pipelines idle for ``idle_s`` with nothing pending; returns how many."""
        now = time.monotonic()
        with self._lock:
            idle = [
                k
                for k, p in self._pipelines.items()
                if p.pending == 0 and now - p.last_used > self.idle_s
            ]
            pipes = [self._pipelines.pop(k) for k in idle]
        for p in pipes:
            p.alive = False
            p.jobs.put(None)
        return len(pipes)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "pipelines": len(self._pipelines),
                "pending": sum(p.pending for p in self._pipelines.values()),
            }

    def close(self) -> None:
        with self._lock:
            pipes = list(self._pipelines.values())
            self._pipelines.clear()
        for p in pipes:
            p.alive = False
            p.jobs.put(None)
