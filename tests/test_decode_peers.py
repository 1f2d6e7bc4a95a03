"""What the decode side knows about its prefill peers, and the failures it reports, driven
by a fake prefill (a real HTTP server on 127.0.0.1 answering ``/spectrum/info``) and
SGLang's real error class: no SGLang servers needed (issue 19, findings 3, 8, 10, 12 and 14)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# (nothing here may import SGLang at collection time: the other modules set up the
# environment SGLang reads at import, and the kernel tests need Triton's interpreter)
from sglang_spectrum.sglang_plugin import compat, messages
from sglang_spectrum.sglang_plugin.decode_side import DecodeSide
from sglang_spectrum.sglang_plugin.identity import wire_identity


class FakeDecode(DecodeSide):
    """The decode-side mixin with the attributes the manager gives it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._init_decode()
        self.prefill_info_table: dict = {}
        self.connection_lock = threading.Lock()
        self.connection_pool: dict = {}
        self.attn_tp_size = 1
        self.arena = None

    def identity(self) -> dict:
        return wire_identity()


@pytest.fixture
def prefill_info():
    """A fake prefill's bootstrap server: ``/spectrum/info`` answers ``body["json"]``."""
    body: dict = {"json": {}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            raw = json.dumps(body["json"]).encode()
            self.send_response(200 if self.path == "/spectrum/info" else 404)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", body
    server.shutdown()
    server.server_close()


def test_a_prefill_announcing_options_the_decode_cannot_read_is_refused_in_one_line(
    prefill_info,
):
    """Finding 12: an unknown peer option used to raise inside ``send_metadata`` on the
    decode's scheduler loop; now the verification returns a one-line refusal."""
    addr, body = prefill_info
    decode = FakeDecode()
    body["json"] = {"ranks": [wire_identity(options={"budget": 0.5})], "server": {"instance": "a"}}
    assert decode._fetch_prefill_verdict(addr) == ""
    assert decode._prefill_peers[addr]["instance"] == "a"
    body["json"] = {"ranks": [wire_identity(options={"budget": 0.5, "warp_drive": 1})]}
    verdict = decode._fetch_prefill_verdict(addr)
    assert "cannot read" in verdict and "warp_drive" in verdict and "\n" not in verdict


def test_a_stale_peer_failure_makes_the_decode_verify_that_prefill_again(prefill_info):
    """Finding 10: a prefill restarted with other options answers ``Failed(stale_peer)``;
    the decode drops what it knew about that prefill (verdict, identity, whether it runs
    another backend, SGLang's cached rank connections) and keeps what it knows about the
    others."""
    addr, body = prefill_info
    other = "127.0.0.1:1"
    decode = FakeDecode()
    body["json"] = {"ranks": [wire_identity(options={"budget": 0.5})], "server": {"instance": "a"}}
    decode._prefill_verdicts.update({addr: decode._fetch_prefill_verdict(addr), other: ""})
    decode._prefill_peers[other] = {"instance": "b"}
    decode.prefill_info_table.update({addr: object(), other: object()})
    decode.connection_pool.update({f"{addr}_0_0": 1, f"{other}_0_0": 2})
    decode._foreign_prefills.update({addr, other})  # as if both had run another backend

    class Receiver:
        bootstrap_addr = addr
        reasons: list[str] = []

        def on_failed(self, reason: str) -> None:
            self.reasons.append(reason)

    receiver = Receiver()
    decode._receivers[(9, 3)] = receiver
    decode._on_decode_message(messages.Failed(room=9, generation=3, reason="x", stale_peer=True))
    assert receiver.reasons == ["x"]
    assert addr not in decode._prefill_verdicts and addr not in decode._prefill_peers
    assert addr not in decode.prefill_info_table
    assert list(decode.connection_pool) == [f"{other}_0_0"]
    assert not decode.prefill_is_foreign(addr) and decode.prefill_is_foreign(other)
    assert decode.prefill_verdict(other) == "" and other in decode._prefill_peers
    # the next request verifies the restarted prefill again, and sees its new instance
    body["json"]["server"] = {"instance": "a2"}
    assert decode._fetch_prefill_verdict(addr) == ""
    assert decode.prefill_instance(addr) == "a2"


@pytest.mark.parametrize(
    "host,url", [("0.0.0.0", "127.0.0.1:8998"), ("::", "[::1]:8998"), ("10.1.2.3", "10.1.2.3:8998")]
)
def test_a_wildcard_bootstrap_host_registers_on_the_loopback(host, url):
    """Finding 14: ``--host 0.0.0.0`` / ``::`` is a bind address, not one to connect to."""
    from sglang_spectrum.sglang_plugin.manager import SpectrumKVManager

    class Manager:
        dist_init_addr = None
        bootstrap_host = host
        bootstrap_port = 8998

    assert SpectrumKVManager._bootstrap_url(Manager()).endswith(url)


@pytest.mark.parametrize("recorded", ["decode refused the request", None])
def test_a_failure_without_a_reason_here_is_from_another_rank(recorded):
    """Finding 14: SGLang logs a failure once, at the rank that recorded it; the other
    ranks raise ``KVTransferError(is_from_another_rank=True)``."""
    from sglang.srt.disaggregation.common.conn import KVTransferError

    class Mgr:
        failure_lock = threading.Lock()
        failure_records = {} if recorded is None else {5: recorded}

    class Endpoint:
        kv_mgr, bootstrap_room, conclude_state, cleared = Mgr(), 5, None, False

        def clear(self) -> None:
            self.cleared = True

    endpoint = Endpoint()
    with pytest.raises(KVTransferError) as err:
        compat.lifecycle._raise_failure(endpoint)
    assert err.value.is_from_another_rank is (recorded is None)
    assert endpoint.cleared and 5 not in Mgr.failure_records
    unknown = "Failed due to an unknown reason from another rank"
    assert err.value.failure_reason == (recorded or unknown)


def test_a_deferred_receiver_whose_request_failed_stops_waiting():
    """Finding 3: a receiver deferred by a full receive arena returned WaitingForInput
    forever once its request had failed (prefill refusal, heartbeat, timeout). Its poll
    now concludes Failed first, leaves the manager's deferred list and sends no Abort
    (nothing was granted, so nobody can write)."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    from sglang_spectrum.sglang_plugin.endpoints import SpectrumKVReceiver
    from sglang_spectrum.sglang_plugin.rooms import ReceiveState

    class Mgr:
        request_status = {5: KVPoll.WaitingForInput}
        failure_records: dict = {}
        deferred: set = set()

        def unregister_deferred(self, receiver) -> None:
            self.deferred.discard(receiver)

    receiver = SpectrumKVReceiver.__new__(SpectrumKVReceiver)  # its poll, not its bootstrap
    receiver.kv_mgr, receiver.bootstrap_room, receiver.conclude_state = Mgr(), 5, None
    receiver.state = ReceiveState()
    assert receiver.state.reserve(lambda: None) == "deferred"  # the arena is full
    receiver.kv_mgr.deferred.add(receiver)
    assert receiver.poll() == KVPoll.WaitingForInput  # back-pressure while it is alive
    receiver.kv_mgr.request_status[5] = KVPoll.Failed
    receiver.kv_mgr.failure_records[5] = "prefill refused the request"
    assert receiver.poll() == KVPoll.Failed
    assert receiver.conclude_state == KVPoll.Failed and receiver.state.phase == "failed"
    assert receiver not in receiver.kv_mgr.deferred
    assert not receiver.state.holds_region and receiver.state.abort_sent_at is None


def test_a_late_failed_after_abort_and_clear_records_nothing():
    """Finding 8: a prefill's ``Failed`` that arrives after the scheduler aborted and
    cleared the receiver re-created SGLang's status and failure entries for the room.
    Now it only frees the region the abort kept and unregisters the receiver."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    from sglang_spectrum.sglang_plugin.endpoints import SpectrumKVReceiver
    from sglang_spectrum.sglang_plugin.rooms import ReceiveState

    class Region:
        released = False

        def release(self) -> None:
            self.released = True

    class Mgr:
        request_status: dict = {}  # SGLang's clear() popped the room
        failure_records: dict = {}
        metrics = None
        registered = True

        def record_failure(self, room, reason) -> None:
            self.failure_records[room] = reason

        def update_status(self, room, status) -> None:
            self.request_status[room] = status

        def retry_deferred(self) -> None:
            pass

        def unregister_receiver(self, receiver) -> None:
            self.registered = False

    receiver = SpectrumKVReceiver.__new__(SpectrumKVReceiver)  # its handlers, not its bootstrap
    receiver.kv_mgr, receiver.bootstrap_room = Mgr(), 5
    receiver.state, region = ReceiveState(), Region()
    assert receiver.state.reserve(lambda: region) == "granted"
    receiver.conclude_state = KVPoll.Failed  # the scheduler's abort ...
    assert receiver.state.fail_local() == (True, None)  # ... sent an Abort, kept the region
    receiver.state.cleared = True  # ... and SGLang cleared the receiver
    receiver.on_failed("the prefill gave the request up")
    assert receiver.kv_mgr.request_status == {} and receiver.kv_mgr.failure_records == {}
    assert region.released and not receiver.kv_mgr.registered
