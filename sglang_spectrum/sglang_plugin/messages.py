"""The backend's own control messages (ZMQ, two frames: tag + msgpack body).

Decode -> prefill (to the prefill rank's PULL socket, ``CommonKVManager.rank_port``):

* :class:`Register`: once per decode rank and prefill rank, before any room: the
  decode's wire identity (checked by the prefill) and where to reach it.
* :class:`Grant`: one per request and decode rank (SGLang's "send metadata"):
  the receive region reserved for the packed KV, the decode's prefix length,
  its metadata (aux) row and page count, and the decode's identity again (a
  restarted prefill that never saw the ``Register`` still verifies it); with
  direct writes, its KV pool's buffers and the request's pages.
* :class:`Abort`: the decode gave the request up; the prefill acknowledges with
  :class:`AbortAck` once no write of its own can land in the region any more.

Generations: every decode receiver draws a random ``generation`` that its
``Grant`` and ``Abort`` carry and every answer echoes. SGLang may reuse a
bootstrap room (PD re-bootstrap), so a late answer for an earlier receiver of
the same room is recognised and dropped instead of freeing or filling the
new receiver's region.

Prefill -> decode (to the decode rank's PULL socket):

* :class:`Landed`: one part of a request sent in parts (a chunk, or a chunk's layer
  group) is written into the receive region; the decode may unpack it now
  (``--spectrum-unpack arrival``) while later parts are computed and sent.
* :class:`Sent`: the packed KV is in the receive region (its parts: offset,
  size, checksum, tokens; the metadata row bytes, per-request stats); the
  decode validates and unpacks each part.
* :class:`Failed`: the request failed on the prefill side, with the reason.
* :class:`AbortAck`: see above.

Every message carries the bootstrap room; unknown tags are dropped with a log line.
"""

from __future__ import annotations

from typing import Any

import msgspec

TAG_REGISTER = b"SPKV_REGISTER"
TAG_GRANT = b"SPKV_GRANT"
TAG_ABORT = b"SPKV_ABORT"
TAG_SENT = b"SPKV_SENT"
TAG_FAILED = b"SPKV_FAILED"
TAG_ABORT_ACK = b"SPKV_ABORT_ACK"
TAG_LANDED = b"SPKV_LANDED"
DIRECT_OFFSET = -1  # a Sent part written straight into the decode's pool pages


class Register(msgspec.Struct, frozen=True):
    session: str  # the decode's Mooncake session id (host:rpc_port)
    endpoint: str  # the decode rank's ZMQ host
    port: int  # the decode rank's ZMQ PULL port
    identity: dict[str, Any]  # wire identity (see identity.wire_identity)


class Grant(msgspec.Struct, frozen=True):
    room: int
    generation: int  # the decode receiver's (random, per request and decode rank)
    session: str
    endpoint: str
    port: int
    region_ptr: int  # receive region (decode memory registered with Mooncake)
    capacity: int  # its size in bytes
    num_pages: int  # pages the decode allocated for the tokens it asks for
    prefix_len: int  # tokens the decode already holds (page aligned); 0 = none
    aux_index: int  # the decode's metadata row
    required: int = 1  # decode ranks that send a grant for this room (all must arrive)
    identity: dict[str, Any] = {}  # the decode's wire identity (as in Register)
    prefill_instance: str = ""  # the prefill instance the decode verified ('' = any)
    # direct writes of lossless parts into the decode's pool (see direct.py); [] = none
    pool_ptrs: list[int] = []  # K buffer of every layer, then every V buffer
    slot_bytes: int = 0  # bytes of one token slot in each buffer
    pool_dtype: str = ""
    pages: bytes = b""  # int64 little-endian: SGLang's page indices of this request
    page_size: int = 0


class Abort(msgspec.Struct, frozen=True):
    room: int
    generation: int
    endpoint: str
    port: int
    reason: str = ""  # why, when the decode refused the request (shown to the client)


class Landed(msgspec.Struct, frozen=True):
    room: int
    generation: int
    index: int  # the part's place in ``Sent.parts`` (parts land in that order)
    part: list[int]  # as in ``Sent.parts``: [offset, bytes, checksum, tokens(, l0, l1)]


class Sent(msgspec.Struct, frozen=True):
    room: int
    generation: int
    nbytes: int  # all parts together
    checksum: int  # of the last part
    aux: list[bytes]  # the prefill's metadata row, one entry per metadata buffer
    stats: dict[str, Any]
    # [offset in the region, bytes, checksum, tokens] of each part, in token order
    # (one per prefill chunk streamed, the last chunk's included); offset -1: the part
    # was written straight into the decode's pool pages (direct.py; checksum 0)
    parts: list[list[int]]


class Failed(msgspec.Struct, frozen=True):
    room: int
    generation: int
    reason: str
    stale_peer: bool = False  # the decode's view of this prefill is out of date


class AbortAck(msgspec.Struct, frozen=True):
    room: int
    generation: int


_TAGS: dict[type, bytes] = {
    Register: TAG_REGISTER,
    Grant: TAG_GRANT,
    Abort: TAG_ABORT,
    Sent: TAG_SENT,
    Failed: TAG_FAILED,
    AbortAck: TAG_ABORT_ACK,
    Landed: TAG_LANDED,
}
_TYPES = {tag: cls for cls, tag in _TAGS.items()}
_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> list[bytes]:
    """ZMQ frames of a message."""
    return [_TAGS[type(msg)], _encoder.encode(msg)]


def decode(frames: list[bytes]) -> msgspec.Struct | None:
    """The message in ``frames``, or None when they are not one of ours (or malformed)."""
    if len(frames) != 2 or frames[0] not in _TYPES:
        return None
    try:
        return msgspec.msgpack.decode(frames[1], type=_TYPES[frames[0]])
    except msgspec.DecodeError:
        return None
