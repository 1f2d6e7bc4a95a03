"""Prefill, scheduler thread: SGLang's chunks in, transfer jobs out.

A mixin of :class:`.manager.SpectrumKVManager`. SGLang's ``CommonKVSender.send``
(0.5.23; :class:`.compat.SenderLifecycle` gives 0.5.17 the same) calls
:meth:`PrefillIntake.add_transfer_request` with each chunk's pages, as it does for
the mooncake and nixl managers. Earlier chunks become parts (``--spectrum-stream
chunks``): each earlier chunk of at least :data:`STREAM_MIN_TOKENS` tokens is
offered to the workers (:meth:`submit_part`; refused while the decode has not
granted, then it joins the next part); at the last chunk the rest of the request
goes (:meth:`submit`). The scheduler never packs: the workers of
:mod:`.prefill_side` do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from . import compat
from .jobs import PackJob

# Smallest earlier chunk sent as its own part: below it the part's fixed costs
# (a pack launch, a header, a Mooncake write) outweigh what the overlap hides.
STREAM_MIN_TOKENS = 256


def expand_pages(pages: np.ndarray, page_size: int) -> np.ndarray:
    """Page indices -> token slots (page * page_size + offset)."""
    pages = np.asarray(pages, dtype=np.int64).reshape(-1)
    if page_size == 1:
        return pages
    return (pages[:, None] * page_size + np.arange(page_size, dtype=np.int64)[None, :]).reshape(-1)


@dataclass
class SendProgress:
    """What SGLang has handed over of one request so far (one per open sender)."""

    sender: Any  # the room's SpectrumKVSender (num_kv_indices, aux_index, created)
    pages: list[np.ndarray] = field(default_factory=list)  # int64 page indices per chunk
    streamed_pages: int = 0  # entries of ``pages`` sent as earlier parts
    streamed_tokens: int = 0
    submitted: bool = False  # the last chunk went to the workers


class PrefillIntake:
    """Scheduler-thread side of the prefill (see the module docstring)."""

    def _init_intake(self) -> None:
        self._sends: dict[int, SendProgress] = {}  # room -> progress (scheduler thread)
        self._chunk_clock: dict[int, float] = {}  # room -> when its last chunk was sent

    def open_room(self, room: int, sender: Any) -> None:
        """A sender was created (after SGLang set its status)."""
        self._sends[room] = SendProgress(sender)
        state = self.rooms.open(room)
        if state is not None:  # the grants came first
            self._mark_ready(room, state.prefix_len)

    def close_intake(self, room: int) -> None:
        self._sends.pop(room, None)
        self._chunk_clock.pop(room, None)
        self._pipe_rooms.pop(room, None)

    def add_transfer_request(
        self,
        bootstrap_room: int,
        kv_indices: npt.NDArray[np.int32],
        index_slice: slice,
        is_last_chunk: bool,
        aux_index: int | None = None,
        state_indices: list | None = None,
        num_kv_tokens: int | None = None,
        *,
        wait_event: Any = None,
        **kwargs: Any,
    ) -> None:
        """``CommonKVManager``'s hook for one chunk of a request: ``kv_indices`` int
        ``[pages]`` of the pool; ``wait_event``: the CUDA event after which the KV of an
        early-sent cached prefix is written (0.5.23), or None."""
        room = bootstrap_room
        progress = self._sends.get(room)
        if progress is None or progress.submitted:
            return
        progress.pages.append(np.asarray(kv_indices, dtype=np.int64).reshape(-1).copy())
        pipe = self.pipelined(room)  # its chunks went in layer groups during the forward
        if not is_last_chunk:  # earlier chunk: its pages stay locked until the request ends
            if pipe is None:
                self._stream_part(progress, index_slice.stop, wait_event)
            else:
                self._note_chunk(room, len(progress.pages[-1]) * self.kv_args.page_size, False)
            return
        progress.submitted = True
        t_start = time.perf_counter()
        page_size = int(self.kv_args.page_size)
        start = self.room_prefix_len(room) + progress.streamed_tokens
        if pipe is not None:  # what the layer groups left (nothing, normally)
            start = pipe.sent_to
        found = compat.prompt_slots(self.scheduler, room)
        context, rid = None, ""
        if found is not None:
            full, rid = found
            slots = full[start:]  # the prompt's own row: exact length, no page padding
            context = full[:start] if start else None
        elif page_size == 1:  # one slot per page: the pages are the slots, from the prefix on
            handed = torch.from_numpy(np.concatenate(progress.pages))
            done = start - self.room_prefix_len(room)  # sent in earlier parts or groups
            slots, context = handed[done:], (handed[:done] if done else None)
        else:
            self.fail_room(
                room,
                f"request of room {room} not found at its last chunk; cannot"
                f" tell its prompt length with page size {page_size}",
            )
            return
        self.submit(progress.sender, rid, slots, context, t_start)

    def _streamed_slots(self, progress: SendProgress, page_size: int) -> torch.Tensor | None:
        """int64 slots of the tokens sent in earlier parts (None: none yet)."""
        done = progress.pages[: progress.streamed_pages]
        return torch.from_numpy(expand_pages(np.concatenate(done), page_size)) if done else None

    def _stream_part(self, progress: SendProgress, pages_so_far: int, event: Any) -> None:
        """Offer the pages not sent yet (whole pages: an earlier chunk ends on a page
        boundary) as one part. Its context is the earlier parts' tokens (a prefix the
        decode holds is not among them: at most a few sinks more stay FP16)."""
        if self.options.stream != "chunks":
            return
        page_size = int(self.kv_args.page_size)
        pending = progress.pages[progress.streamed_pages :]
        tokens = sum(len(p) for p in pending) * page_size
        if tokens < STREAM_MIN_TOKENS:
            return
        slots = torch.from_numpy(expand_pages(np.concatenate(pending), page_size))
        rest = (int(progress.sender.num_kv_indices) - pages_so_far) * page_size
        context = self._streamed_slots(progress, page_size)
        if self.submit_part(progress.sender, slots, context, rest, event):
            progress.streamed_pages = len(progress.pages)
            progress.streamed_tokens += tokens

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
        """The last chunk: hand the request (its tokens not sent in an earlier part) to
        the workers (``t_start``: when this chunk arrived, for the stats)."""
        room = sender.bootstrap_room
        aux = self.aux_rows.read(sender.aux_index) if sender.aux_index is not None else []
        job = PackJob(room, slots, context, aux, self._kv_written_events(), rid)
        job.request_tokens = int(sender.num_kv_indices) * int(self.kv_args.page_size)
        job.request_start = getattr(sender, "created", t_start)
        self._note_chunk(room, int(slots.numel()), final=True)
        job.scheduler_ms = (time.perf_counter() - t_start) * 1e3
        if self.rooms.park_or_take(room, job):
            self._workers.submit(self.rooms.get(room).peer_key, job)

    def submit_part(
        self,
        sender: Any,
        slots: torch.Tensor,
        context: torch.Tensor | None,
        rest_tokens: int,
        event: Any = None,
    ) -> bool:
        """An earlier chunk: hand ``slots`` (int64 ``[T]``, whole pages) to the workers
        as one part. Accepted only once every decode rank granted and when this part
        and the ``rest_tokens`` still to come fit the granted region after the parts
        before it; False leaves them to the next part. ``event``: a CUDA event SGLang
        recorded for this KV on another stream, or None."""
        from sglang_spectrum.transfer import part_offset

        t_start = time.perf_counter()
        room = sender.bootstrap_room
        with self.rooms.lock:
            state = self.rooms.get(room)
            if state is None or state.aborted or not state.complete:
                return False
            capacity = min(g.capacity for g in state.grants.values())
            cfg = self.codec_config()
            reserved = part_offset(state.reserved) + self.region_bound(int(slots.numel()), cfg)
            if part_offset(reserved) + self.region_bound(rest_tokens, cfg) > capacity:
                return False
            if not self.rooms.enter_flight(room):
                return False
            state.reserved = reserved
            key = state.peer_key
        job = PackJob(room, slots, context, [], self._kv_written_events(event), "", final=False)
        job.rest_tokens = int(rest_tokens)
        job.request_tokens = int(sender.num_kv_indices) * int(self.kv_args.page_size)
        job.request_start = getattr(sender, "created", t_start)
        self._note_chunk(room, int(slots.numel()), final=False)
        job.scheduler_ms = (time.perf_counter() - t_start) * 1e3
        self._workers.submit(key, job)
        return True

    def _note_chunk(self, room: int, tokens: int, final: bool) -> None:
        """The time between two chunks of a request sent in parts is the prefill compute
        of the second one: a sample of seconds per token for the adaptive budget."""
        if self.adaptive is None:
            return
        now = time.perf_counter()
        last = self._chunk_clock.pop(room, None)
        if last is not None:
            self.adaptive.observe_compute(tokens, now - last)
        if not final:
            self._chunk_clock[room] = now
