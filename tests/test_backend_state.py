"""State machines of the ``spectrum`` backend driven by a fake peer (no SGLang servers).

The decode peer's messages are built with the real message classes and fed to
the prefill's :class:`~sglang_spectrum.sglang_plugin.rooms.PrefillRooms`; the
prefill's answers to the decode's :class:`~sglang_spectrum.sglang_plugin.rooms.ReceiveState`.
Races are run on real threads; every test ends with the per-room tables back to empty.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import zmq

from sglang_spectrum.sglang_plugin import messages
from sglang_spectrum.sglang_plugin.rooms import AckTarget, PrefillRooms, ReceiveState
from sglang_spectrum.sglang_plugin.transport import RegisteredArena
from sglang_spectrum.sglang_plugin.workers import FailedSessions, TransferWorkers


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def grant(room: int, gen: int = 7, session: str = "d0", required: int = 1) -> messages.Grant:
    return messages.Grant(
        room=room,
        generation=gen,
        session=session,
        endpoint="127.0.0.1",
        port=9,
        region_ptr=4096,
        capacity=1 << 20,
        num_pages=4,
        prefix_len=0,
        aux_index=0,
        required=required,
    )


def target(gen: int = 7) -> AckTarget:
    return AckTarget("127.0.0.1", 9, gen)


# ----------------------------------------------------------------------------- prefill


def test_grant_before_sender_is_ready_when_the_sender_opens():
    rooms = PrefillRooms()
    assert rooms.grant(grant(1)) == ("pending", None)  # the request is not here yet
    assert rooms.open(1) is not None  # the sender finds the room ready
    assert rooms.open(2) is None
    assert rooms.grant(grant(2)) == ("complete", None)
    rooms.clear(1)
    rooms.clear(2)
    assert rooms.sizes()["rooms"] == 0


def test_all_decode_ranks_must_grant_and_a_parked_job_goes_once():
    rooms = PrefillRooms()
    rooms.open(5)
    assert not rooms.park_or_take(5, "job")  # parked: nobody granted yet
    assert rooms.grant(grant(5, session="a", required=2))[0] == "pending"
    assert rooms.grant(grant(5, session="b", required=2)) == ("complete", "job")
    assert rooms.get(5).in_flight == 1 and rooms.get(5).peer_key == ("a", "b")
    assert rooms.leave_flight(5) == ([], [], "")
    rooms.clear(5)
    assert rooms.sizes()["rooms"] == 0


def test_late_grant_and_abort_for_a_cleared_room_create_nothing():
    rooms = PrefillRooms()
    rooms.open(3)
    rooms.grant(grant(3, gen=11))
    rooms.clear(3)
    assert rooms.sizes() == {"rooms": 0, "tombstones": 1}
    assert rooms.grant(grant(3, gen=11)) == ("stale", None)  # a duplicate of the old grant
    assert rooms.sizes()["rooms"] == 0
    # a late abort is acknowledged at once (nothing in flight) and leaves nothing behind
    assert rooms.abort(3, target(11)) == [target(11)]
    assert rooms.sizes() == {"rooms": 0, "tombstones": 1}
    # an abort of a room never seen here leaves an aborted entry: a sender opened later
    # finds it aborted (the entry expires as an orphan)
    assert rooms.abort(5, target(11)) == [target(11)]
    assert rooms.sizes()["rooms"] == 1 and rooms.get(5).aborted
    # the same room reused (PD re-bootstrap): a new generation is a new receiver
    rooms2 = PrefillRooms()
    rooms2.open(3)
    rooms2.grant(grant(3, gen=11))
    rooms2.clear(3)
    rooms2.open(3)
    assert rooms2.grant(grant(3, gen=12)) == ("complete", None)


def test_abort_in_flight_is_acknowledged_by_the_last_job_out():
    rooms = PrefillRooms()
    rooms.open(9)
    rooms.grant(grant(9))
    assert rooms.enter_flight(9) and rooms.enter_flight(9)  # two parts queued
    assert rooms.abort(9, target()) == []  # writes may still land
    assert not rooms.enter_flight(9)  # nothing new after the abort
    assert rooms.leave_flight(9) == ([], [], "")
    assert rooms.leave_flight(9) == ([target()], [], "")  # now the region is free
    rooms.clear(9)
    assert rooms.sizes()["rooms"] == 0


def test_clear_while_in_flight_deletes_when_the_last_job_leaves():
    rooms = PrefillRooms()
    rooms.open(4)
    rooms.grant(grant(4))
    rooms.enter_flight(4)
    rooms.clear(4)
    assert rooms.get(4) is not None and rooms.get(4).cleared
    assert not rooms.enter_flight(4)
    rooms.leave_flight(4)
    assert rooms.sizes()["rooms"] == 0


def test_failure_is_told_once_per_decode_rank_after_the_flight():
    rooms = PrefillRooms()
    rooms.open(6)
    rooms.grant(grant(6, session="a", required=2))
    rooms.grant(grant(6, session="b", required=2))
    rooms.enter_flight(6)
    assert rooms.fail(6, "boom") == []  # a write is in flight: told when it ends
    targets, tell, reason = rooms.leave_flight(6)
    assert targets == [] and {g.session for g in tell} == {"a", "b"} and reason == "boom"
    assert rooms.fail(6, "again") == []  # told already
    rooms.clear(6)
    # a room that failed before the decode granted: the grant is answered with the failure
    rooms.open(8)
    rooms.fail(8, "timed out")
    outcome, tell = rooms.grant(grant(8))
    assert outcome == "failed" and [g.session for g in tell] == ["d0"]
    rooms.clear(8)
    assert rooms.sizes()["rooms"] == 0


def test_orphans_and_tombstones_expire():
    clock = Clock()
    rooms = PrefillRooms(orphan_ttl_s=10, tombstone_ttl_s=20, clock=clock)
    rooms.grant(grant(1))  # the request never reaches this prefill
    rooms.abort(2, target())  # aborted before it arrived
    rooms.open(3)
    rooms.grant(grant(3))
    rooms.clear(3)
    clock.t += 11
    assert sorted(rooms.sweep()) == [1, 2]
    assert rooms.sizes() == {"rooms": 0, "tombstones": 1}
    clock.t += 10
    rooms.sweep()
    assert rooms.sizes() == {"rooms": 0, "tombstones": 0}


def test_aborted_senders_never_cleared_are_named_after_a_while():
    """SGLang releases a request aborted mid-prefill without clearing its sender."""
    clock = Clock()
    rooms = PrefillRooms(clock=clock)
    rooms.open(1)
    rooms.open(2)
    rooms.enter_flight(2)
    rooms.sender_aborted(1)
    rooms.sender_aborted(2)
    clock.t += 30
    assert rooms.stale_aborted(ttl_s=60) == []
    clock.t += 31
    assert rooms.stale_aborted(ttl_s=60) == [1]  # 2 still has a job in flight
    rooms.leave_flight(2)
    assert rooms.stale_aborted(ttl_s=60) == [1, 2]
    for room in (1, 2):
        rooms.clear(room)
    assert rooms.sizes()["rooms"] == 0


def test_abort_send_clear_races_leave_nothing_behind():
    """Threads play the scheduler (open, submit parts, clear), the decode (grant,
    abort) and the workers (leave the flight); every abort is acknowledged exactly
    once and only when nothing of its room is in flight."""
    rooms = PrefillRooms()
    acked: dict[int, int] = {}
    in_flight_at_ack: list[int] = []
    lock = threading.Lock()

    def ack(room: int, targets: list[AckTarget]) -> None:
        with lock:
            for _ in targets:
                acked[room] = acked.get(room, 0) + 1
                state = rooms.get(room)
                in_flight_at_ack.append(state.in_flight if state else 0)

    def one(room: int) -> None:
        rng = random.Random(room)
        rooms.open(room)
        rooms.grant(grant(room, gen=room))
        jobs = [rooms.enter_flight(room) for _ in range(rng.randint(0, 3))]

        def worker():
            for entered in jobs:
                time.sleep(rng.random() * 0.002)
                if entered:
                    targets, _, _ = rooms.leave_flight(room)
                    ack(room, targets)

        def decode():
            time.sleep(rng.random() * 0.003)
            ack(room, rooms.abort(room, target(room)))

        threads = [threading.Thread(target=worker), threading.Thread(target=decode)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rooms.clear(room)

    rooms_ids = list(range(1, 201))
    threads = [threading.Thread(target=one, args=(r,)) for r in rooms_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acked == dict.fromkeys(rooms_ids, 1)
    assert set(in_flight_at_ack) == {0}
    assert rooms.sizes()["rooms"] == 0


# ----------------------------------------------------------------------------- decode


class FakeRegion:
    def __init__(self) -> None:
        self.released = 0
        self.capacity = 100

    def release(self) -> None:
        self.released += 1


def test_receive_region_held_until_the_prefill_acknowledges_an_abort():
    clock = Clock()
    state = ReceiveState(generation=5, clock=clock, ack_timeout_s=60)
    region = FakeRegion()
    assert state.reserve(lambda: region) == "granted"
    assert state.reserve(lambda: FakeRegion()) == "held" and state.region is region
    send_abort, now = state.fail_local()
    assert send_abort and now is None and state.holds_region
    assert state.begin_unpack(5) is None  # a Sent after the abort is not unpacked
    assert state.on_abort_ack(6) is None  # an ack for another receiver of this room
    assert state.on_abort_ack(5) is region and not state.holds_region


def test_abort_ack_timeout_frees_the_region_of_a_dead_prefill():
    clock = Clock()
    state = ReceiveState(generation=5, clock=clock, ack_timeout_s=60)
    region = FakeRegion()
    state.reserve(lambda: region)
    state.fail_local()
    clock.t += 59
    assert state.expire() is None
    clock.t += 2
    assert state.expire() is region and state.expire() is None


def test_nothing_granted_means_nothing_to_wait_for():
    state = ReceiveState(generation=5)
    assert state.fail_local() == (False, None)
    assert not state.holds_region


def test_deferred_grant_expires():
    clock = Clock()
    state = ReceiveState(generation=5, clock=clock, defer_timeout_s=30)
    assert state.reserve(lambda: None) == "deferred"
    clock.t += 20
    assert state.reserve(lambda: None) == "deferred" and not state.defer_expired()
    clock.t += 11
    assert state.defer_expired()
    assert state.reserve(lambda: None) == "expired"
    region = FakeRegion()
    fresh = ReceiveState(generation=6, clock=clock, defer_timeout_s=30)
    fresh.reserve(lambda: None)
    clock.t += 5
    assert fresh.reserve(lambda: region) == "granted"


def test_sent_unpacks_once_and_releases():
    state = ReceiveState(generation=5)
    region = FakeRegion()
    state.reserve(lambda: region)
    with state.lock:
        assert state.begin_unpack(4) is None  # stale generation
        assert state.begin_unpack(5) is region
    assert state.finish(ok=True) is region
    assert state.begin_unpack(5) is None and state.concluded
    assert state.fail_local() == (False, None)  # nothing held: no abort


def test_an_abort_during_an_unpack_waits_for_that_part_only():
    """Finding 12: the scheduler's abort waits for the part being unpacked (never more),
    then no later part is unpacked: SGLang 0.5.17 frees the request's KV pages as soon
    as ``abort()`` returns, so an unpack still writing then would write into pages of
    another request."""
    state = ReceiveState(generation=5)
    state.reserve(lambda: FakeRegion())
    unpacking, part_done = threading.Event(), threading.Event()

    def unpack_one_part():
        with state.lock:
            assert state.begin_unpack(5) is not None
            unpacking.set()
            time.sleep(0.2)  # the part's unpack
            part_done.set()

    worker = threading.Thread(target=unpack_one_part)
    worker.start()
    assert unpacking.wait(5)
    assert state.fail_local() == (True, None)  # the abort: waits for the part
    assert part_done.is_set()
    worker.join()
    with state.lock:
        assert state.begin_unpack(5) is None  # the next part is not unpacked
    assert state.holds_region  # until the prefill acknowledges the abort


def test_receive_arena_deferral_under_a_full_arena_with_a_real_arena():
    arena = RegisteredArena(1 << 12, __import__("torch").device("cpu"), None, "receive")
    states = [ReceiveState() for _ in range(6)]
    outcomes = [s.reserve(lambda: arena.alloc(1 << 10)) for s in states]
    assert outcomes == ["granted"] * 4 + ["deferred"] * 2
    states[0].finish(ok=True).release()
    assert states[4].reserve(lambda: arena.alloc(1 << 10)) == "granted"
    for s in states[1:5]:
        s.finish(ok=True).release()
    assert states[5].reserve(lambda: arena.alloc(1 << 10)) == "granted"
    states[5].finish(ok=True).release()
    assert arena.in_use == 0


def test_arena_alloc_wait_returns_when_a_region_is_freed():
    import torch

    arena = RegisteredArena(1 << 12, torch.device("cpu"), None, "send")
    held = arena.alloc(1 << 12)
    threading.Timer(0.1, held.release).start()
    t0 = time.monotonic()
    region = arena.alloc_wait(1 << 11, timeout_s=5)
    assert region is not None and time.monotonic() - t0 < 2
    region.release()
    assert arena.alloc_wait(1 << 13, timeout_s=0.05) is None  # never fits: gives up


def test_host_staging_sends_a_copy_and_frees_the_packed_region():
    """``--spectrum-staging host``: the packed part is copied into the staging arena (the
    buffer the writer hands Mooncake) and its packing region is released at once."""
    import types

    import torch

    from sglang_spectrum.sglang_plugin.prefill_side import PrefillSide

    packed_arena = RegisteredArena(1 << 12, torch.device("cpu"), None, "send")
    staging = RegisteredArena(1 << 12, torch.device("cpu"), None, "send staging")
    region = packed_arena.alloc(3000)
    payload = torch.randint(0, 256, (3000,), dtype=torch.uint8)
    region.view()[:3000].copy_(payload)
    side = types.SimpleNamespace(staging=staging, engine=None, room_aborted=lambda room: False)
    host = PrefillSide._stage_on_host(side, region, 3000, None, room=5)
    assert torch.equal(host.view()[:3000], payload)
    assert host.view().data_ptr() != region.view().data_ptr()
    assert packed_arena.in_use == 0 and staging.in_use >= 3000
    host.release()
    assert staging.in_use == 0


def test_host_staging_is_refused_with_the_nvlink_transport(monkeypatch):
    from sglang_spectrum.sglang_plugin.options import staging_problem

    for name in ("SGLANG_MOONCAKE_CUSTOM_MEM_POOL", "MC_INTRANODE_NVLINK"):
        monkeypatch.delenv(name, raising=False)
    assert staging_problem("host") == "" and staging_problem("device") == ""
    monkeypatch.setenv("SGLANG_MOONCAKE_CUSTOM_MEM_POOL", "INTRA_NODE_NVLINK")
    problem = staging_problem("host")
    assert "NVLink transport" in problem and "\n" not in problem
    assert staging_problem("device") == ""


def test_auto_staging_is_host_under_mooncake_tcp_only(monkeypatch):
    """The default ``--spectrum-staging auto`` stages on the host where Mooncake's TCP
    transport is forced, and never where host staging would be refused (NVLink)."""
    from sglang_spectrum.sglang_plugin.options import (
        SpectrumServerOptions,
        resolved_staging,
        staging_problem,
    )

    names = ("SGLANG_MOONCAKE_CUSTOM_MEM_POOL", "MC_INTRANODE_NVLINK", "MC_FORCE_TCP")
    for name in (*names, "MOONCAKE_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    assert SpectrumServerOptions().staging == "auto"
    assert resolved_staging("auto") == "device"  # RDMA: Mooncake reads GPU memory itself
    monkeypatch.setenv("MOONCAKE_PROTOCOL", "rdma")
    assert resolved_staging("auto") == "device"
    monkeypatch.setenv("MOONCAKE_PROTOCOL", "TCP")  # SGLang's other way to pick TCP
    assert resolved_staging("auto") == "host"
    monkeypatch.delenv("MOONCAKE_PROTOCOL")
    monkeypatch.setenv("MC_FORCE_TCP", "0")
    assert not SpectrumServerOptions().host_staging
    monkeypatch.setenv("MC_FORCE_TCP", "1")
    assert SpectrumServerOptions().host_staging
    assert not SpectrumServerOptions(staging="device").host_staging
    monkeypatch.setenv("MC_INTRANODE_NVLINK", "true")
    assert resolved_staging("auto") == "device" and staging_problem("auto") == ""
    assert SpectrumServerOptions(staging="host").host_staging  # refused at launch instead


# ----------------------------------------------------------------------------- workers


def test_one_dead_peer_never_delays_another():
    """Peer "dead" blocks in its write; jobs of peer "live" keep flowing, in order."""
    release_dead = threading.Event()
    written: list[tuple[str, int]] = []
    lock = threading.Lock()

    def pack(job):
        return job

    def write(job, packed):
        peer, i = job
        if peer == "dead":
            release_dead.wait(10)
        with lock:
            written.append(job)

    workers = TransferWorkers(pack, write, lambda *a: None, depth=2)
    for i in range(3):
        workers.submit(("dead",), ("dead", i))
    for i in range(20):
        workers.submit(("live",), ("live", i))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with lock:
            if sum(1 for p, _ in written if p == "live") == 20:
                break
        time.sleep(0.01)
    with lock:
        assert [i for p, i in written if p == "live"] == list(range(20))
        assert not any(p == "dead" for p, _ in written)
    release_dead.set()
    deadline = time.monotonic() + 5
    while workers.stats()["pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [i for p, i in written if p == "dead"] == [0, 1, 2]
    workers.idle_s = 0
    assert workers.reap_idle() == 2 and workers.stats() == {"pipelines": 0, "pending": 0}


def test_pack_of_the_next_job_overlaps_the_write_of_this_one():
    events: list[str] = []
    lock = threading.Lock()

    def pack(job):
        with lock:
            events.append(f"pack{job}")
        return job

    def write(job, packed):
        time.sleep(0.05)
        with lock:
            events.append(f"write{job}")

    workers = TransferWorkers(pack, write, lambda *a: None, depth=2)
    for i in range(3):
        workers.submit(("p",), i)
    deadline = time.monotonic() + 5
    while workers.stats()["pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events.index("pack1") < events.index("write0")
    assert [e for e in events if e.startswith("write")] == ["write0", "write1", "write2"]
    workers.close()


def test_a_crashing_stage_is_cleaned_up_and_the_pipeline_lives_on():
    crashed: list[tuple] = []
    written: list[int] = []

    def pack(job):
        if job == 1:
            raise TypeError("a bug in the pack stage")
        return job

    def write(job, packed):
        if job == 2:
            raise ValueError("a bug in the write stage")
        written.append(job)

    workers = TransferWorkers(pack, write, lambda j, p, e: crashed.append((j, p, type(e))))
    for i in range(4):
        workers.submit(("p",), i)
    deadline = time.monotonic() + 5
    while workers.stats()["pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert crashed == [(1, None, TypeError), (2, 2, ValueError)]
    assert written == [0, 3] and workers.stats()["pending"] == 0
    workers.close()


def test_failed_sessions_expire_and_are_forgiven():
    clock = Clock()
    failed = FailedSessions(ttl_s=30, clock=clock)
    failed.mark("a")
    assert failed.failed(["b", "a"]) == "a"
    clock.t += 31
    assert failed.failed(["a"]) is None and len(failed) == 0
    failed.mark("b")
    failed.forgive("b")
    assert failed.failed(["b"]) is None


# ----------------------------------------------------------------------------- control loop


def test_housekeeping_runs_under_continuous_traffic():
    """The old loop swept only after 500 ms without a message: a steady stream of
    messages starved it. The loop must sweep on time whatever the traffic."""
    from sglang_spectrum.sglang_plugin import manager

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")

    class Fake:
        is_prefill = True
        server_socket = pull
        _stop = threading.Event()
        sweeps = 0
        handled = 0

        def _housekeeping(self):
            self.sweeps += 1

        def _on_prefill_message(self, msg):
            self.handled += 1

    fake = Fake()
    loop = threading.Thread(target=manager.SpectrumKVManager._control_loop, args=(fake,))
    loop.start()
    t_end = time.monotonic() + 2.2
    while time.monotonic() < t_end:  # a message every 10 ms
        push.send_multipart(messages.encode(messages.AbortAck(1, 1)))
        time.sleep(0.01)
    fake._stop.set()
    loop.join(5)
    push.close(0)
    pull.close(0)
    assert fake.handled > 100
    assert fake.sweeps >= 3, fake.sweeps


@pytest.mark.parametrize("cls", [messages.Grant, messages.Abort, messages.AbortAck])
def test_generation_travels_in_every_room_message(cls):
    fields = cls.__struct_fields__
    assert "generation" in fields and "room" in fields


# ----------------------------------------------------------------------------- compat reads


def test_stream_chunk_size_is_the_schedulers_resolved_one():
    """0.5.23 keeps ServerArgs.chunked_prefill_size None when it is chosen per GPU; the
    scheduler's resolved value is what the prefill streams parts of."""
    from types import SimpleNamespace

    from sglang_spectrum.sglang_plugin import compat

    assert compat.chunked_prefill_size(SimpleNamespace(chunked_prefill_size=8192)) == 8192
    assert compat.chunked_prefill_size(SimpleNamespace(chunked_prefill_size=None)) == 0
    assert compat.chunked_prefill_size(SimpleNamespace(chunked_prefill_size=-1)) == 0


def test_unsupported_deployments_are_named_in_one_line(monkeypatch):
    from types import SimpleNamespace

    from sglang_spectrum.sglang_plugin.compat import unsupported_deployment

    ok = SimpleNamespace(pp_size=1, dp_size=2, speculative_algorithm=None)
    assert unsupported_deployment(ok) == ""
    # speculative decoding is served: the draft pool's KV travels with the target's
    # (its pool is checked when the scheduler hands it over: tests/test_speculative.py)
    for algo in ("EAGLE", "EAGLE3", "STANDALONE", "NGRAM"):
        assert unsupported_deployment(SimpleNamespace(speculative_algorithm=algo)) == ""
    cases = {
        "pipeline": dict(pp_size=2),
        "context parallelism": dict(attn_cp_size=2),
        "kv-cache-sharding": dict(enable_kv_cache_sharding=True),
        "early only": dict(disaggregation_decode_allocation_policy="prefill_complete"),
    }
    for words, fields in cases.items():
        problem = unsupported_deployment(SimpleNamespace(**fields))
        assert words in problem and "\n" not in problem, (words, problem)
    monkeypatch.setenv("SGLANG_DISAGG_STAGING_BUFFER", "1")
    assert "staging" in unsupported_deployment(ok)


def test_layer_groups_refused_where_the_layer_hooks_cannot_run():
    """--spectrum-layer-group needs the prefill's attention layers called eagerly: a
    prefill CUDA graph (SGLang's CUDA default is breakable) or a speculative draft is
    refused in one line; a CPU server, --disable-cuda-graph or a disabled prefill
    backend is served; a decode ignores the option."""
    from types import SimpleNamespace

    from sglang_spectrum.sglang_plugin.compat import unsupported_deployment
    from sglang_spectrum.sglang_plugin.options import SpectrumServerOptions

    groups = SpectrumServerOptions(layer_group=8)

    def prefill(**fields):
        return SimpleNamespace(disaggregation_mode="prefill", **fields)

    for served in (
        prefill(device="cpu"),
        prefill(device="cuda", disable_cuda_graph=True),
        prefill(device="cuda", cuda_graph_backend_prefill="disabled"),
        SimpleNamespace(disaggregation_mode="decode", device="cuda"),
    ):
        assert unsupported_deployment(served, groups) == "", served
    refused = {
        "backend is breakable": prefill(device="cuda", cuda_graph_backend_prefill="breakable"),
        "backend is full": prefill(device="cuda", cuda_graph_backend_prefill="full"),
        "speculative decoding": prefill(device="cpu", speculative_algorithm="EAGLE"),
    }
    for words, args in refused.items():
        problem = unsupported_deployment(args, groups)
        assert words in problem and "--spectrum-layer-group 0" in problem, problem
        assert "\n" not in problem
        assert unsupported_deployment(args, SpectrumServerOptions()) == ""


# ----------------------------------------------------------------------------- warm-up


def _warm_up_case(device: str):
    """Zero pools (as at startup) of 2 layers x 2 KV heads x 64 on ``device``, the two
    configs an ``auto`` server warms up (lossless and the lowest budget) and their bound."""
    import torch

    from sglang_spectrum.config import SpectrumConfig
    from sglang_spectrum.transfer import packed_size_bound

    kp = [torch.zeros(128, 2, 64, dtype=torch.bfloat16, device=device) for _ in range(2)]
    vp = [torch.zeros_like(p) for p in kp]
    configs = [SpectrumConfig(budget=b, key_scales="channel", allow_drop=False) for b in (0.3, 1.0)]

    def bound(n, cfg):
        return packed_size_bound(n, 2, 2, 64, torch.bfloat16, cfg)

    return kp, vp, configs, bound


def test_warm_up_packs_and_unpacks_through_an_arena_region_and_gives_it_back():
    """Finding 14: the kernels compile at startup. Here on the CPU (torch path): every
    config runs through a region of the arena, the arena is empty afterwards, the zero
    pools stay zero, and a full arena stops the warm-up instead of failing it."""
    import torch

    from sglang_spectrum.sglang_plugin.manager import warm_up_kernels

    kp, vp, configs, bound = _warm_up_case("cpu")
    arena = RegisteredArena(1 << 20, torch.device("cpu"), None, "receive")
    assert warm_up_kernels(kp, vp, arena, configs, bound) == ["torch", "torch"]
    assert arena.in_use == 0
    assert all(bool((p == 0).all()) for p in kp + vp)
    held = arena.alloc(arena.size)  # nothing left for a warm-up region
    assert warm_up_kernels(kp, vp, arena, configs, bound) == []
    held.release()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_warm_up_under_host_staging_packs_on_the_device_and_stages_the_bytes():
    """The decode's receive arena is pinned host memory under host staging (Mooncake TCP):
    the warm-up packed into it and failed ("out must be a uint8 tensor on cuda:0", every
    TCP decode log of the H200 runs), so the first request paid the JIT. Now it packs on
    the pools' device, stages the bytes into the host region and unpacks from there."""
    import torch

    from sglang_spectrum.sglang_plugin.manager import warm_up_kernels

    kp, vp, configs, bound = _warm_up_case("cuda")
    for where in ("cpu", "cuda"):  # host staging, device staging
        arena = RegisteredArena(1 << 20, torch.device(where), None, "receive")
        assert warm_up_kernels(kp, vp, arena, configs, bound) == ["kernels", "kernels"]
        assert arena.in_use == 0
    torch.cuda.synchronize()
    assert all(bool((p == 0).all()) for p in kp + vp)
