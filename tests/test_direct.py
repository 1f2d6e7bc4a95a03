"""Direct writes (``--spectrum-direct``): lossless parts page to page through a real
Mooncake engine over TCP on 127.0.0.1, the slot runs they are cut into, the pages a
decode keeps while such a write may land, and the budget rule that knows they cost no
codec. End to end (SGLang PD, budget 1.0): tests/test_pd_serving.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang_spectrum.sglang_plugin.adaptive import EXPLORE_EVERY, AdaptiveBudget
from sglang_spectrum.sglang_plugin.direct import (
    PoolMemory,
    direct_writes,
    slot_runs,
    write_direct,
)
from sglang_spectrum.sglang_plugin.rooms import ReceiveState

LAYERS, SLOTS, HEADS, DIM = 3, 256, 2, 16


def _pools(
    fill: bool, dtype=torch.bfloat16, slots: int = SLOTS
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    make = (lambda: torch.randn(slots, HEADS, DIM).to(dtype)) if fill else (
        lambda: torch.zeros(slots, HEADS, DIM, dtype=dtype)
    )  # fmt: skip
    return [make() for _ in range(LAYERS)], [make() for _ in range(LAYERS)]


def _paged(rng: np.random.Generator, tokens: int, page: int) -> np.ndarray:
    """Slots of ``tokens`` tokens on random distinct pages of ``page`` slots."""
    pages = rng.choice(SLOTS // page, size=-(-tokens // page), replace=False)
    return (pages[:, None] * page + np.arange(page)[None, :]).reshape(-1)[:tokens]


@pytest.mark.parametrize("page", [1, 4, 16])
def test_slot_runs_cover_every_pair_once_and_are_maximal(page):
    rng = np.random.default_rng(page)
    src, dst = _paged(rng, 100, page), _paged(rng, 100, page)
    s0, d0, n = slot_runs(src, dst)
    got_src = np.concatenate([np.arange(a, a + k) for a, k in zip(s0, n)])
    got_dst = np.concatenate([np.arange(a, a + k) for a, k in zip(d0, n)])
    assert np.array_equal(got_src, src) and np.array_equal(got_dst, dst)
    # maximal: no run could continue into the next one on both sides
    ends_src, ends_dst = s0[:-1] + n[:-1], d0[:-1] + n[:-1]
    assert not np.any((ends_src == s0[1:]) & (ends_dst == d0[1:]))
    with pytest.raises(ValueError, match="9 source slots for 8"):
        slot_runs(src[:9], dst[:8])


def test_pool_memory_describes_contiguous_equal_slot_buffers_only():
    k, v = _pools(False)
    mem = PoolMemory.of(k, v, "bfloat16")
    assert mem.slot_bytes == HEADS * DIM * 2 and len(mem.ptrs) == 2 * LAYERS
    assert mem.ptrs[0] == k[0].data_ptr() and mem.ptrs[LAYERS] == v[0].data_ptr()
    assert mem.fits(list(mem.ptrs), mem.slot_bytes, "bfloat16")
    assert not mem.fits(list(mem.ptrs), mem.slot_bytes, "float8_e4m3fn")  # asymmetric pair
    assert not mem.fits(list(mem.ptrs[:-2]), mem.slot_bytes, "bfloat16")  # other layers
    assert not mem.fits(list(mem.ptrs), mem.slot_bytes // 2, "bfloat16")  # other heads
    strided = [t[:, :1] for t in k]  # one head of two: not contiguous
    assert PoolMemory.of(strided, v, "bfloat16") is None


def test_a_fragmented_part_is_packed_instead():
    k, v = _pools(False)
    mem = PoolMemory.of(k, v, "bfloat16")
    src = np.arange(0, 200, 2)  # every other slot: 100 runs, one write each per buffer
    writes = 100 * 2 * LAYERS
    assert direct_writes(src, src, mem, list(mem.ptrs), max_writes=writes - 1) is None
    srcs, dsts, lengths = direct_writes(src, src, mem, list(mem.ptrs), max_writes=writes)
    assert len(srcs) == len(dsts) == len(lengths) == writes
    assert set(lengths) == {mem.slot_bytes}


@pytest.fixture
def engines(monkeypatch):
    """Two fresh Mooncake engines (SGLang's wrapper) over TCP on 127.0.0.1 (fresh: a
    test's pools are registered once, as a server's)."""
    monkeypatch.setenv("MC_FORCE_TCP", "1")
    from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
        MooncakeTransferEngine,
    )

    return tuple(
        MooncakeTransferEngine(hostname="127.0.0.1", gpu_id=0, ib_device=None) for _ in "ab"
    )


@pytest.mark.parametrize("page", [1, 16])
def test_direct_write_lands_exactly_in_the_peer_pool_slots(engines, page):
    """Prefill pool -> decode pool, page to page, through Mooncake TCP: every sent slot
    of every layer holds the prefill's bytes, every other slot is untouched."""
    prefill, decode = engines
    rng = np.random.default_rng(page)
    sk, sv = _pools(True)
    dk, dv = _pools(False)
    src_mem, dst_mem = PoolMemory.of(sk, sv, "bfloat16"), PoolMemory.of(dk, dv, "bfloat16")
    assert src_mem.register(prefill) == 0 and dst_mem.register(decode) == 0
    tokens = 120
    src, dst = _paged(rng, tokens, page), _paged(rng, tokens, page)
    # two parts, as two chunks of one request: the second continues at token 70
    for lo, hi in ((0, 70), (70, tokens)):
        writes = direct_writes(src[lo:hi], dst[lo:hi], src_mem, list(dst_mem.ptrs))
        assert write_direct(prefill, decode.get_session_id(), writes) == 0
    untouched = torch.ones(SLOTS, dtype=torch.bool)
    untouched[torch.from_numpy(dst)] = False
    for layer in range(LAYERS):
        for s_pool, d_pool in ((sk[layer], dk[layer]), (sv[layer], dv[layer])):
            assert torch.equal(d_pool[torch.from_numpy(dst)], s_pool[torch.from_numpy(src)])
            assert not d_pool[untouched].any()


def test_a_part_of_more_writes_than_one_mooncake_batch_takes_lands_exactly(engines):
    """Mooncake's TCP transport fails a batch of more than 2048 writes (and, after some
    such failures, every later batch of the session): a fragmented part of 3072 writes
    goes in batches of MAX_BATCH_WRITES (1024) and lands exactly; the session still
    works."""
    prefill, decode = engines
    slots = 512
    sk, sv = _pools(True, slots=slots)
    dk, dv = _pools(False, slots=slots)
    src_mem, dst_mem = PoolMemory.of(sk, sv, "bfloat16"), PoolMemory.of(dk, dv, "bfloat16")
    assert src_mem.register(prefill) == 0 and dst_mem.register(decode) == 0
    dst = np.arange(slots)
    src = dst.reshape(-1, 2)[:, ::-1].reshape(-1)  # pairs swapped: a run per slot
    writes = direct_writes(src, dst, src_mem, list(dst_mem.ptrs))
    assert len(writes[0]) == slots * 2 * LAYERS == 3072 > 2048
    assert write_direct(prefill, decode.get_session_id(), writes) == 0
    for layer in range(LAYERS):
        for s_pool, d_pool in ((sk[layer], dk[layer]), (sv[layer], dv[layer])):
            assert torch.equal(d_pool[torch.from_numpy(dst)], s_pool[torch.from_numpy(src)])
    one = direct_writes(np.array([5]), np.array([5]), src_mem, list(dst_mem.ptrs))
    assert write_direct(prefill, decode.get_session_id(), one) == 0


class _Region:
    def release(self) -> None:
        pass


def test_pages_offered_for_direct_writes_are_held_until_the_prefill_is_done():
    """A receiver that offered its pages reports a failure to SGLang (which then frees
    them) only once no direct write can land: the region's lifetime bounds them."""
    state = ReceiveState(generation=3)
    state.direct = True
    state.reserve(_Region)
    assert state.pages_may_be_written
    state.fail_local()  # abort sent, waiting for the prefill's ack
    assert state.pages_may_be_written
    state.on_abort_ack(3)
    assert not state.pages_may_be_written
    plain = ReceiveState(generation=4)
    plain.reserve(_Region)
    assert not plain.pages_may_be_written  # packed parts land in the region only


def test_auto_budget_goes_lossless_when_the_part_would_be_written_directly():
    """On a link where the lossless part's copies in and out of the arenas cost more
    than compression saves, auto compresses; written page to page, the same part goes
    lossless (b = 1.0)."""
    full = 4096 * 131072  # a 4k-token Llama-3-8B prompt
    ab = AdaptiveBudget(min_budget=0.3)
    peer = ("decode",)
    for _ in range(3):
        ab.observe_write(peer, 256 << 20, (256 << 20) / 100e9)  # 100 GB/s
        ab.observe_pack(0.5, full, 1.5e-3)  # the codec at b < 1
        ab.observe_pack(1.0, full, 5.0e-3)  # the gather at b = 1 (a slow one)
        ab.observe_compute(4096, 0.02)
    args = (peer, full, 0.0, 0, 0.0, 4096)
    assert ab.choose(*args) < 1.0
    assert ab.choose(*args, direct=True) == 1.0


def test_auto_budget_never_explores_the_codec_for_direct_lossless_parts():
    """Single-chunk requests (no compute estimate): the wire alone would compress a
    little, the codec makes lossless faster. Packed lossless parts re-measure the codec
    every EXPLORE_EVERY-th part; direct ones stay lossless (on the H200's NVLink the
    explored parts packed and unpacked 4k requests for nothing)."""
    full = 4096 * 131072
    ab = AdaptiveBudget(min_budget=0.3)
    peer = ("decode",)
    ab.observe_write(peer, 256 << 20, (256 << 20) / 600e9)  # NVLink-like
    ab.observe_pack(0.5, full, 1.0e-3)
    ab.observe_pack(1.0, full, 0.05e-3)  # a fast gather: the codec looks 20x dearer
    args = (peer, full, 0.0, 0, 0.0, 4096)
    packed = [ab.choose(*args) for _ in range(2 * EXPLORE_EVERY)]
    assert 1.0 in packed and min(packed) < 1.0  # explored
    assert [ab.choose(*args, direct=True) for _ in range(2 * EXPLORE_EVERY)] == [1.0] * (
        2 * EXPLORE_EVERY
    )
