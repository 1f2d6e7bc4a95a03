"""Prefill, scheduler thread: layer-group pipelining (``--spectrum-layer-group N``).

A mixin of :class:`.manager.SpectrumKVManager`. Without it a chunk's KV can only be
packed once SGLang hands the chunk over, after its whole forward. With it, each
chunk of a pipelined request is sent as parts of ``N`` layers, each packed and
written while the forward computes the layers after it:

* BEFORE ``Scheduler.run_batch``: :meth:`LayerPipeline.pipeline_begin` reads the
  extend batch's rows (:func:`.compat.extend_rows`: each request's chunk
  positions and pool slots, known before its first layer runs) and picks the
  requests it pipelines.
* AFTER ``RadixAttention.forward``: :meth:`LayerPipeline.pipeline_layer_done`, at
  every ``N``-th layer (and the last), records a CUDA event on the forward's
  stream and hands each pipelined request a part of layers ``[l0, l1)`` of the
  chunk; the packer waits for that event, not for the forward. Not an AFTER hook
  on the pool's ``set_kv_buffer``: attention backends that write the KV inside
  their own kernels never call it, and every layer of every model passes here.
* AFTER ``Scheduler.run_batch``: :meth:`LayerPipeline.pipeline_end` checks every
  layer was seen (a captured prefill forward would skip the hooks: such a
  deployment is refused at startup, and a request that slips through fails with
  the reason rather than reach the decode incomplete).

The tier map of a chunk comes from its first group's key norms (the packer of
group 0 scores and allocates; the later groups of the chunk are packed with that
map, ``pack_request(..., tiers=)``), so a part never waits for the chunk's last
layer. ``bench/results/quality.md`` (``+knG``) measures that choice against the
whole-prompt map. When SGLang then hands the chunk over
(:meth:`.prefill_intake.PrefillIntake.add_transfer_request`) only the
bookkeeping is left; at the last chunk any positions not pipelined go as one
ordinary part, then ``Sent``.

A request is pipelined from its first chunk on when that chunk runs alone in its
batch, the decode has granted, nothing before that chunk is left to send (no
cached prefix the decode lacks), and its lossless parts (a budget of 1.0, or
``auto``) would not go page to page (:mod:`.direct`). Alone: when the prefill
batches several requests it is loaded, and each request's parts already overlap
the forwards of the batches after it; measured on the H200 (TCP, b=0.5, 4096
tokens, 4 concurrent requests, two a batch), layer groups there took the TTFT p50
from 354 to 644 ms (the parts of two requests during one forward, each pack
contending with it), while one request a batch gained at every length
(``bench/results/serving_gpu_h200_layer_groups_tcp.md``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import compat
from .jobs import PackJob

logger = logging.getLogger(__name__)

# the prefill managers that pipeline, in this process (one per scheduler)
_PIPELINING: list[Any] = []


@dataclass
class RoomPipe:
    """One pipelined request's progress (scheduler thread)."""

    sent_to: int  # prompt positions before this one are sent or held by the decode
    context: list[torch.Tensor] = field(default_factory=list)  # slots of earlier chunks


@dataclass
class _Row:
    """One pipelined request's chunk in the running batch."""

    room: int
    sender: Any
    rid: str
    slots: torch.Tensor  # int64 [T] pool slots (the pool's device)
    context: torch.Tensor | None  # int64 [P] slots of its earlier chunks
    end: int  # the prompt position after the chunk


@dataclass
class _Batch:
    rows: list[_Row]
    next_layer: int = 0  # the first layer not yet handed to the packers


class LayerPipeline:
    """Scheduler-thread side of layer-group pipelining (see the module docstring)."""

    def _init_pipeline(self) -> None:
        self._pipe_rooms: dict[int, RoomPipe | None] = {}  # room -> progress; None: not
        self._pipe_batch: _Batch | None = None
        self.layer_group = int(self.options.layer_group) if self.is_prefill else 0

    def start_pipelining(self) -> None:
        """At attach (prefill, ``--spectrum-layer-group`` > 0; what the hooks cannot
        serve was refused at startup: :func:`.compat.unsupported_deployment`): let the
        hooks reach this manager."""
        if self not in _PIPELINING:
            _PIPELINING.append(self)
        logger.info(
            "SpectrumKV prefill: layer-group pipelining on, %d layers a part (%d groups)",
            self.layer_group,
            self.options.layer_groups(len(self.k_pools)),
        )

    def pipelined(self, room: int) -> RoomPipe | None:
        """``room``'s progress if its chunks go in layer groups, else None."""
        return self._pipe_rooms.get(room) or None

    # ------------------------------------------------------------------ hooks

    def pipeline_begin(self, batch: Any) -> None:
        """BEFORE ``run_batch``: the requests of ``batch`` whose chunk goes in layer
        groups (none: this batch runs as without pipelining)."""
        from .endpoints import SpectrumKVSender

        self._pipe_batch = None
        rows = []
        extend = compat.extend_rows(batch, SpectrumKVSender)
        for room, sender, rid, start, n, offset in extend:
            pipe = self._pipe_rooms.get(room, False)
            if pipe is False:  # its first chunk: decide once
                pipe = self._pipe_rooms[room] = self._may_pipeline(room, start, len(extend))
            if pipe is None:
                continue
            if start > pipe.sent_to:  # (chunks are consecutive: never seen)
                self.fail_room(room, f"SpectrumKV: chunk at {start} after {pipe.sent_to}")
                continue
            skip = pipe.sent_to - start
            if skip >= n:  # the decode holds this whole chunk
                continue
            slots = batch.out_cache_loc[offset + skip : offset + n]
            context = torch.cat(pipe.context) if pipe.context else None
            rows.append(_Row(room, sender, rid, slots, context, start + n))
            pipe.context.append(slots)
            pipe.sent_to = start + n
        if rows:
            self._pipe_batch = _Batch(rows)

    def _may_pipeline(self, room: int, start: int, batch_size: int) -> RoomPipe | None:
        """A progress record if ``room``'s chunk at prompt position ``start`` (its first
        one run, in a batch of ``batch_size`` requests) starts the pipeline, else None."""
        if batch_size > 1:  # batched requests: see the module docstring
            return None
        progress = self._sends.get(room)
        if progress is None or progress.pages or progress.submitted:
            return None  # SGLang handed pages over already (a cached prefix sent early)
        with self.rooms.lock:
            state = self.rooms.get(room)
            if state is None or not state.live or not state.complete:
                return None
            grants = list(state.grants.values())
            prefix = state.prefix_len
        lossless = self.options.adaptive or self.options.budget >= 1.0
        if start > prefix or (lossless and self._direct_grant(grants) is not None):
            return None  # (page to page is faster than any packed part)
        logger.debug("SpectrumKV: room %s goes in layer groups from position %d", room, prefix)
        return RoomPipe(sent_to=prefix)

    def pipeline_layer_done(self, layer_id: int) -> None:
        """AFTER each attention layer's forward: at a group's last layer, hand every
        pipelined request its part of layers ``[l0, layer_id + 1)``."""
        batch = self._pipe_batch
        end = layer_id + 1
        if batch is None or end <= batch.next_layer:
            return
        if end % self.layer_group and end != len(self.k_pools):
            return
        first, batch.next_layer = batch.next_layer, end
        events = []
        if self.k_pools[0].is_cuda:  # the forward's stream: the KV of these layers is queued
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.k_pools[0].device))
            events.append(event)
        for row in batch.rows:
            self._submit_group(row, first, end, events)

    def pipeline_end(self) -> None:
        """AFTER ``run_batch``: every layer must have been handed over."""
        batch, self._pipe_batch = self._pipe_batch, None
        if batch is None or batch.next_layer >= len(self.k_pools):
            return
        for row in batch.rows:
            self.fail_room(
                row.room,
                f"SpectrumKV layer pipelining saw layers up to {batch.next_layer} of"
                f" {len(self.k_pools)} in a prefill forward (a captured forward skips the"
                " layer hooks); run the prefill with --spectrum-layer-group 0",
            )

    def _submit_group(self, row: _Row, first: int, end: int, events: list[Any]) -> None:
        """Hand one layer group of ``row``'s chunk to the room's transfer workers; a part
        that no longer fits the decode's region fails the room (the decode sizes its
        region for every chunk's groups: it never should)."""
        from sglang_spectrum.transfer import part_offset

        t_start = time.perf_counter()
        room, tokens = row.room, int(row.slots.numel())
        with self.rooms.lock:
            state = self.rooms.get(room)
            if state is None or not state.live:
                return  # failed or aborted: the last chunk's job reports it
            capacity = min(g.capacity for g in state.grants.values())
            bound = self.region_bound(tokens, self.codec_config(), layers=end - first)
            reserved = part_offset(state.reserved) + bound
            fits = reserved <= capacity
            if fits and not self.rooms.enter_flight(room):
                return
            if fits:
                state.reserved = reserved
                key = state.peer_key
        if not fits:
            self.fail_room(
                room,
                f"SpectrumKV: layers {first}-{end} of {tokens} tokens do not fit the decode's"
                f" region ({reserved} of {capacity} bytes); run the same sglang-spectrum"
                " version and --spectrum-layer-group on both sides",
            )
            return
        sender = row.sender
        job = PackJob(room, row.slots, row.context, [], list(events), row.rid, final=False)
        job.layers = (first, end)
        job.request_tokens = int(sender.num_kv_indices) * int(self.kv_args.page_size)
        # what is still to compute: the prompt after this chunk, and its later layers
        later = tokens * (len(self.k_pools) - end) // len(self.k_pools)
        job.rest_tokens = max(job.request_tokens - row.end, 0) + later
        job.request_start = getattr(sender, "created", t_start)
        job.scheduler_ms = (time.perf_counter() - t_start) * 1e3
        self._workers.submit(key, job)


# ------------------------------------------------------------------ SGLang hooks


def before_run_batch(scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    for mgr in _PIPELINING:
        if mgr.scheduler is scheduler:
            _guarded(mgr, mgr.pipeline_begin, batch)
    return None


def after_run_batch(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    for mgr in _PIPELINING:
        if mgr.scheduler is scheduler:
            _guarded(mgr, mgr.pipeline_end)
    return None


def after_attention(result: Any, layer: Any, *args: Any, **kwargs: Any) -> None:
    for mgr in _PIPELINING:
        if mgr._pipe_batch is not None:
            _guarded(mgr, mgr.pipeline_layer_done, int(layer.layer_id))
    return None


def _guarded(mgr: Any, fn: Any, *args: Any) -> None:
    """Run a hook; an error fails the batch's pipelined requests, never the forward."""
    try:
        fn(*args)
    except Exception as e:
        batch, mgr._pipe_batch = mgr._pipe_batch, None
        logger.error("SpectrumKV layer pipelining failed: %s: %s", type(e).__name__, e)
        for row in batch.rows if batch is not None else []:
            mgr.fail_room(row.room, f"SpectrumKV layer pipelining failed: {e}")


HOOKS = (
    ("sglang.srt.managers.scheduler.Scheduler.run_batch", before_run_batch, "BEFORE"),
    ("sglang.srt.managers.scheduler.Scheduler.run_batch", after_run_batch, "AFTER"),
    ("sglang.srt.layers.radix_attention.RadixAttention.forward", after_attention, "AFTER"),
)
