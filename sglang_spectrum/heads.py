"""Which KV heads travel between the ranks of a prefill and a decode of different attention
TP sizes (heterogeneous TP), as pure functions of (KV heads, prefill TP, decode TP, rank).

SGLang's MHA pool on attention-TP rank ``r`` of ``tp`` holds ``max(1, kv_heads // tp)``
heads ``[num_slots, H_rank, head_dim]``: global heads ``r * H_rank ..`` when ``kv_heads >=
tp``, else the one head ``r // (tp // kv_heads)`` (GQA replication:
``QKVParallelLinear``'s ``num_kv_head_replicas``). The head assignment mirrors SGLang's
mooncake backend exactly (0.5.17 and 0.5.23: ``CommonKVReceiver``'s
``_resolve_rank_mapping`` chooses the prefill ranks a decode rank pulls from,
``staging_buffer.compute_head_slice_params`` the head ranges of each pair):

- ``p == d``: decode rank ``r`` <- prefill rank ``r``, every head.
- ``p < d``: decode rank ``r`` <- prefill rank ``r // (d / p)``; the prefill rank sends
  each of its ``d / p`` decode ranks the heads that rank holds (a head range of its pool,
  the same range to every decode replica of a head).
- ``p > d``: decode rank ``r`` <- prefill ranks ``r * (p / d) ..``, each its whole pool
  into its own head range of the decode pool.

One departure: where ``p > d`` and prefill ranks are replicas (``kv_heads < p``), several
of a decode rank's prefill ranks hold the same heads; mooncake writes them once per
replica (the same bytes twice). Here only the first of them (lowest rank) sends, so every
head of a decode pool is written exactly once; the other replicas send that decode rank
nothing (:func:`prefill_slices` lists no slice for it).

Ranks are attention-TP ranks (SGLang: ``engine_rank % attn_tp_size``); head ranges are
half-open ``(first, end)`` indices into the rank's own pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import SpectrumConfigError

__all__ = [
    "HeadSlice",
    "decode_slices",
    "heads_per_rank",
    "prefill_slices",
    "rank_heads",
    "source_ranks",
]


@dataclass(frozen=True)
class HeadSlice:
    """One head range moved from a prefill rank's pool into a decode rank's pool.

    Attributes:
        prefill_rank, decode_rank: attention-TP ranks.
        src: heads ``[h0, h1)`` of the prefill rank's pool (``pack_request(heads=src)``).
        dst: heads ``[g0, g1)`` of the decode rank's pool (``unpack_request(heads=dst)``);
            ``h1 - h0 == g1 - g0``.
    """

    prefill_rank: int
    decode_rank: int
    src: tuple[int, int]
    dst: tuple[int, int]

    @property
    def num_heads(self) -> int:
        return self.src[1] - self.src[0]


def _check(kv_heads: int, *tp_sizes: int) -> None:
    """Raise unless SGLang could shard ``kv_heads`` over each TP size and the sizes divide
    one another."""
    if kv_heads < 1 or any(t < 1 for t in tp_sizes):
        raise SpectrumConfigError(f"KV heads {kv_heads} and TP sizes {tp_sizes} must be >= 1")
    for tp in tp_sizes:
        if kv_heads % tp and tp % kv_heads:
            raise SpectrumConfigError(
                f"{kv_heads} KV heads cannot be sharded over attention TP {tp} (one must"
                " divide the other)"
            )
    lo, hi = min(tp_sizes), max(tp_sizes)
    if hi % lo:
        raise SpectrumConfigError(f"attention TP sizes {tp_sizes} must divide one another")


def _rank(rank: int, tp: int, what: str) -> None:
    if not 0 <= rank < tp:
        raise SpectrumConfigError(f"{what} rank {rank} out of range for TP {tp}")


def heads_per_rank(kv_heads: int, tp: int) -> int:
    """KV heads of each rank's pool: ``max(1, kv_heads // tp)``."""
    _check(kv_heads, tp)
    return max(1, kv_heads // tp)


def rank_heads(kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """Global KV heads ``[first, end)`` the pool of attention-TP ``rank`` holds."""
    n = heads_per_rank(kv_heads, tp)
    _rank(rank, tp, "TP")
    first = rank * n if kv_heads >= tp else rank // (tp // kv_heads)
    return first, first + n


def source_ranks(prefill_tp: int, decode_tp: int, decode_rank: int) -> list[int]:
    """The prefill ranks decode rank ``decode_rank`` pulls from (SGLang's
    ``target_tp_ranks`` of a non-MLA pool), replicas included."""
    if decode_tp >= prefill_tp:
        return [decode_rank // (decode_tp // prefill_tp)]
    per = prefill_tp // decode_tp
    return list(range(decode_rank * per, (decode_rank + 1) * per))


def _pair(kv_heads: int, p: int, d: int, q: int, r: int) -> HeadSlice:
    """``compute_head_slice_params`` of prefill rank ``q`` and decode rank ``r``."""
    src_n, dst_n = max(1, kv_heads // p), max(1, kv_heads // d)
    if p > d:
        unique = q // max(1, p // kv_heads)
        dst0 = unique * src_n % dst_n
        return HeadSlice(q, r, (0, src_n), (dst0, dst0 + src_n))
    unique = r // max(1, d // kv_heads)
    src0 = unique * dst_n % src_n
    return HeadSlice(q, r, (src0, src0 + dst_n), (0, dst_n))


def decode_slices(
    kv_heads: int, prefill_tp: int, decode_tp: int, decode_rank: int
) -> list[HeadSlice]:
    """What decode rank ``decode_rank`` receives, ordered by prefill rank: one slice per
    sending prefill rank (replicas of heads already listed send nothing). The ``dst``
    ranges partition ``[0, heads_per_rank(kv_heads, decode_tp))``.

    The decode rank expects exactly these parts (one buffer each, unpacked with
    ``unpack_request(..., heads=s.dst)``); every prefill rank of :func:`source_ranks`
    still answers for the request's status."""
    _check(kv_heads, prefill_tp, decode_tp)
    _rank(decode_rank, decode_tp, "decode")
    out: list[HeadSlice] = []
    seen: set[tuple[int, int]] = set()
    for q in source_ranks(prefill_tp, decode_tp, decode_rank):
        held = rank_heads(kv_heads, prefill_tp, q)
        if held in seen:  # a replica of a prefill rank already sending these heads
            continue
        seen.add(held)
        out.append(_pair(kv_heads, prefill_tp, decode_tp, q, decode_rank))
    return out


def prefill_slices(
    kv_heads: int, prefill_tp: int, prefill_rank: int, decode_tp: int
) -> list[HeadSlice]:
    """What prefill rank ``prefill_rank`` sends, ordered by decode rank: one slice (one
    packed buffer, ``pack_request(..., heads=s.src)``) per decode rank it feeds. Empty
    when this rank is a replica whose heads another prefill rank sends."""
    _check(kv_heads, prefill_tp, decode_tp)
    _rank(prefill_rank, prefill_tp, "prefill")
    if decode_tp >= prefill_tp:
        per = decode_tp // prefill_tp
        targets = range(prefill_rank * per, (prefill_rank + 1) * per)
    else:
        targets = [prefill_rank // (prefill_tp // decode_tp)]
    return [
        s
        for r in targets
        for s in decode_slices(kv_heads, prefill_tp, decode_tp, r)
        if s.prefill_rank == prefill_rank
    ]
