"""What the prefill's scheduler thread hands its transfer workers (:class:`PackJob`), and
what their pack stage hands the write stage (:class:`Packed`): see
:mod:`.prefill_side` and :mod:`.workers`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import messages
from .transport import Region


@dataclass
class PackJob:
    """One request (or part of one) handed from the prefill scheduler to the workers."""

    room: int
    slots: torch.Tensor  # int64 [T] pool slots to send (host, or the pool's device: last chunk)
    context: torch.Tensor | None  # int64 [P] slots before these (scored, not sent)
    aux: list[bytes]  # the metadata row (final part only)
    events: list[Any]  # torch.cuda.Events after which its KV is written (none on a CPU)
    rid: str
    final: bool = True  # the last chunk's part (False: an earlier chunk, more follow)
    rest_tokens: int = 0  # prompt tokens still to compute after this part
    request_tokens: int = 0  # the whole prompt's tokens
    request_start: float = 0.0  # perf_counter when the sender was created (SLO clock)
    enqueued: float = field(default_factory=time.perf_counter)
    scheduler_ms: float = 0.0  # time the scheduler thread spent on this request's send
    layers: tuple[int, int] | None = None  # a layer group's part: layers [l0, l1); None: all


@dataclass
class Packed:
    """What the pack stage hands to the write stage."""

    region: Region | None  # None: nothing to write (see _nothing_to_send)
    offset: int  # where this part goes in the decode's region
    nbytes: int  # bytes to write
    checksum: int
    info: Any  # transfer.PackedRequest
    budget: float  # the budget it was packed at
    grants: list[messages.Grant]
    pack_ms: float
    register_ms: float
    one_off: bool
    fault: str | None
    started: float
    direct: tuple[list[int], list[int], list[int]] | None = None  # a direct part's batch
