"""The ``spectrum`` PD transfer backend: SGLang KV manager/sender/receiver/bootstrap classes.

Stage 1 (this file): the classes subclass SGLang's Mooncake backend
(``disaggregation/mooncake/conn.py``) and move KV exactly like it. What is
SpectrumKV-specific already:

* the manager creates the shared Mooncake engine itself (SGLang's model runner
  only does that for the string ``"mooncake"``, ``model_runner.py:1036``);
* both sides exchange and validate a *wire identity* (codec ``FORMAT_VERSION``
  + plugin protocol) at bootstrap: prefill ranks register it at the bootstrap
  server (``PUT /spectrum/register``), decode reads ``GET /spectrum/info`` and
  refuses a prefill that differs; decode appends its identity to the ZMQ
  messages it sends to prefill (two trailing frames ``[b"SPECTRUM", json]``),
  and prefill refuses a decode that differs or sends none;
* the scheduler-startup hook (:mod:`.startup`) attaches the KV pool.

The packed path (gather, pack, one bulk write; unpack before decode) plugs in at
the two ``TODO(spectrum-packed)`` markers; see ``DESIGN.md`` §7.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import requests
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.mooncake.conn import (
    MooncakeKVBootstrapServer,
    MooncakeKVManager,
    MooncakeKVReceiver,
    MooncakeKVSender,
)
from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType
from sglang.srt.utils.network import NetworkAddress

from . import BACKEND_NAME, PROTOCOL_VERSION
from .options import SpectrumServerOptions, check_no_drop, options_from_server_args

logger = logging.getLogger(__name__)

TRAILER_TAG = b"SPECTRUM"  # decode -> prefill: [..., TRAILER_TAG, json identity]
REJECT_HEADER = b"SPECTRUM_REJECT"  # decode -> prefill: [hdr, room, reason]
FAIL_HEADER = b"SPECTRUM_FAIL"  # prefill -> decode: [hdr, room, reason]
# Testing only: pretend another codec format version (to exercise the refusal).
TEST_VERSION_ENV = "SGLANG_SPECTRUM_TEST_FORMAT_VERSION"


def format_version() -> int:
    from sglang_spectrum.codec import FORMAT_VERSION

    override = os.environ.get(TEST_VERSION_ENV)
    return int(override) if override else int(FORMAT_VERSION)


def wire_identity(opts: SpectrumServerOptions | None = None) -> dict[str, Any]:
    """What a SpectrumKV server tells its peers about itself."""
    import sglang_spectrum

    ident: dict[str, Any] = {
        "backend": BACKEND_NAME,
        "format_version": format_version(),
        "protocol": PROTOCOL_VERSION,
        "plugin_version": getattr(sglang_spectrum, "__version__", "?"),
    }
    if opts is not None:
        ident["options"] = opts.to_dict()
    return ident


def incompatibility(peer: dict[str, Any] | None, peer_desc: str, local_role: str) -> str:
    """'' if ``peer`` speaks our wire format, else the refusal message."""
    if not peer or peer.get("backend") != BACKEND_NAME:
        return (
            f"{peer_desc} is not a SpectrumKV server (it must run"
            f" --disaggregation-transfer-backend {BACKEND_NAME}); refusing the transfer"
        )
    mine = format_version()
    if peer.get("format_version") != mine or peer.get("protocol") != PROTOCOL_VERSION:
        return (
            f"SpectrumKV format version mismatch: {peer_desc} speaks"
            f" v{peer.get('format_version')} (protocol {peer.get('protocol')}), this"
            f" {local_role} server speaks v{mine} (protocol {PROTOCOL_VERSION}); run the"
            f" same sglang-spectrum version on prefill and decode"
        )
    return ""


def split_trailer(msg: list[bytes]) -> tuple[list[bytes], dict[str, Any] | None]:
    """Remove our trailing ``[TRAILER_TAG, json]`` frames; returns (frames, identity)."""
    if len(msg) >= 2 and msg[-2] == TRAILER_TAG:
        try:
            return msg[:-2], json.loads(msg[-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return msg[:-2], {}
    return msg, None


class _InterceptingSocket:
    """Wraps the manager's ZMQ PULL socket read by SGLang's bootstrap/decode thread.

    ``on_message`` returns the (possibly rewritten) message for SGLang, or None
    when it consumed it. Everything else is delegated to the real socket.
    """

    def __init__(self, sock: Any, on_message: Callable[[list[bytes]], list[bytes] | None]):
        self._sock = sock
        self._on_message = on_message

    def recv_multipart(self, *args: Any, **kwargs: Any) -> list[bytes]:
        while True:
            msg = self._sock.recv_multipart(*args, **kwargs)
            try:
                out = self._on_message(msg)
            except Exception:  # never kill SGLang's thread because of us
                logger.exception("spectrum: failed to inspect a ZMQ message; passing it on")
                out = msg
            if out is not None:
                return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _TrailerSocket:
    """Wraps a PUSH socket to prefill: appends our identity frames to every message."""

    def __init__(self, sock: Any, trailer: list[bytes]):
        self._sock = sock
        self._trailer = trailer

    def send_multipart(self, frames: list[bytes], *args: Any, **kwargs: Any) -> Any:
        return self._sock.send_multipart(list(frames) + self._trailer, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SpectrumKVManager(MooncakeKVManager):
    """Mooncake manager + wire-identity checks + KV pool access (packed path: next stage)."""

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: DisaggregationMode,
        server_args: Any,
        is_mla_backend: bool | None = False,
    ):
        # Set before super().__init__: it registers to bootstrap and starts threads.
        self.spectrum_options = options_from_server_args(server_args)
        self.identity = wire_identity(self.spectrum_options)
        self.identity_frames = [TRAILER_TAG, json.dumps(self.identity).encode("utf-8")]
        self.kv_pool: Any = None
        self.scheduler: Any = None
        self._peer_lock = threading.Lock()
        self._decode_sessions: dict[str, str] = {}  # prefill: session -> '' ok | reason
        self._failed_rooms: set[int] = set()  # prefill: rooms we refused (Failed is sticky)
        self._prefill_verdicts: dict[str, str] = {}  # decode: bootstrap addr -> '' | reason
        self._prefill_is_spectrum: dict[str, bool] = {}
        self._pinned_failures: dict[int, str] = {}  # decode: reasons sent by prefill
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        logger.info(
            "SpectrumKV %s manager ready: %s",
            disaggregation_mode.value,
            json.dumps(self.identity, sort_keys=True),
        )

    # ------------------------------------------------------------------ setup

    def init_engine(self) -> None:
        from sglang.srt.disaggregation.mooncake.conn import get_mooncake_transfer_engine

        engine = get_mooncake_transfer_engine()
        if engine is None:
            from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
                init_mooncake_transfer_engine,
            )

            engine = init_mooncake_transfer_engine(
                hostname=self.local_ip,
                gpu_id=self.kv_args.gpu_id,
                ib_device=(
                    self.server_args.disaggregation_ib_device
                    or getattr(self.server_args, "mooncake_ib_device", None)
                ),
            )
        self.engine = engine

    def attach_kv_pool(self, kv_pool: Any, scheduler: Any) -> None:
        """Called by the scheduler-startup hook with the token-to-KV pool."""
        self.kv_pool = kv_pool
        self.scheduler = scheduler
        head_dim = getattr(kv_pool, "head_dim", None)
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            check_no_drop(self.spectrum_options, head_dim)
        logger.info(
            "SpectrumKV: KV pool attached (%s, layers=%s, kv_heads=%s, head_dim=%s,"
            " dtype=%s, page_size=%s)",
            type(kv_pool).__name__,
            getattr(kv_pool, "layer_num", "?"),
            getattr(kv_pool, "head_num", "?"),
            head_dim,
            getattr(kv_pool, "store_dtype", getattr(kv_pool, "dtype", "?")),
            getattr(kv_pool, "page_size", "?"),
        )

    def _bootstrap_base_url(self) -> str:
        # same host choice as CommonKVManager.register_to_bootstrap (common/conn.py:330-337)
        if self.dist_init_addr:
            host = NetworkAddress.parse(self.dist_init_addr).resolved().host
        else:
            host = self.bootstrap_host
        return NetworkAddress(host, self.bootstrap_port).to_url()

    def register_to_bootstrap(self) -> None:
        super().register_to_bootstrap()
        payload = dict(
            self.identity,
            attn_dp_rank=self.attn_dp_rank,
            attn_cp_rank=self.attn_cp_rank,
            attn_tp_rank=self.attn_tp_rank,
            pp_rank=self.pp_rank,
            system_dp_rank=self.system_dp_rank,
        )
        try:
            r = requests.put(
                f"{self._bootstrap_base_url()}/spectrum/register", json=payload, timeout=5
            )
            if r.status_code != 200:
                logger.error("SpectrumKV registration refused: %s %s", r.status_code, r.text)
        except Exception as e:
            logger.error("SpectrumKV failed to register to the bootstrap server: %s", e)

    def start_prefill_thread(self) -> None:
        self.server_socket = _InterceptingSocket(self.server_socket, self._on_prefill_message)
        super().start_prefill_thread()

    def start_decode_thread(self) -> None:
        self.server_socket = _InterceptingSocket(self.server_socket, self._on_decode_message)
        super().start_decode_thread()

    # ------------------------------------------------------------------ status

    def update_status(self, bootstrap_room: int, status: int) -> None:
        if bootstrap_room in self._failed_rooms:
            status = KVPoll.Failed  # a refused room must not be revived by a later event
        super().update_status(bootstrap_room, status)

    def record_failure(self, bootstrap_room: int, failure_reason: str) -> None:
        # keep the precise reason a SpectrumKV prefill sent over a generic one
        super().record_failure(
            bootstrap_room, self._pinned_failures.get(bootstrap_room, failure_reason)
        )

    def _prefill_unique_rank(self) -> int:
        # as in MooncakeKVManager.transfer_worker (mooncake/conn.py:1171-1175)
        return (
            self.attn_tp_rank * (self.pp_size * self.attn_cp_size)
            + self.pp_rank * self.attn_cp_size
            + self.attn_cp_rank
        )

    # ------------------------------------------------------------------ prefill side

    def _on_prefill_message(self, msg: list[bytes]) -> list[bytes] | None:
        frames, peer = split_trailer(msg)
        if frames and frames[0] == REJECT_HEADER:
            room, reason = int(frames[1].decode("ascii")), frames[2].decode("utf-8")
            logger.error("SpectrumKV: decode refused room %s: %s", room, reason)
            self._fail_room(room, f"decode server refused the transfer: {reason}")
            return None
        if len(frames) < 4:
            return frames
        room = frames[0].decode("ascii", "replace")
        if room in ("WATERMARK", "STAGING_RSP"):
            return frames
        session = frames[3].decode("ascii", "replace")
        endpoint = frames[1].decode("ascii", "replace")
        peer_desc = f"decode at {endpoint} (session {session})"
        if room == "None":  # KV-args registration of one decode rank (mooncake/conn.py:1397)
            verdict = incompatibility(peer, peer_desc, "prefill")
            with self._peer_lock:
                self._decode_sessions[session] = verdict
            if verdict:
                logger.error("SpectrumKV: %s", verdict)
            return frames
        with self._peer_lock:
            verdict = self._decode_sessions.get(session)
        if verdict is None:
            verdict = incompatibility(peer, peer_desc, "prefill")
        if verdict:
            try:
                dst_port = int(frames[2].decode("ascii"))
                self._fail_room(
                    int(room), verdict, endpoint, dst_port, notify_reason=peer is not None
                )
            except ValueError:
                logger.error("SpectrumKV: malformed room message from %s dropped", endpoint)
            return None
        return frames

    def _fail_room(
        self,
        room: int,
        reason: str,
        endpoint: str | None = None,
        dst_port: int | None = None,
        notify_reason: bool = False,
    ) -> None:
        self._failed_rooms.add(room)
        self.record_failure(room, reason)
        self.update_status(room, KVPoll.Failed)
        if endpoint is None or dst_port is None:
            return
        na = NetworkAddress(endpoint, dst_port)
        sock = self._connect(na.to_tcp(), is_ipv6=na.is_ipv6)
        if notify_reason:  # only a SpectrumKV decode understands this message
            sock.send_multipart([FAIL_HEADER, str(room).encode("ascii"), reason.encode("utf-8")])
        self.sync_status_to_decode_endpoint(
            endpoint, dst_port, room, KVPoll.Failed, self._prefill_unique_rank()
        )

    # ------------------------------------------------------------------ decode side

    def _on_decode_message(self, msg: list[bytes]) -> list[bytes] | None:
        if msg and msg[0] == FAIL_HEADER and len(msg) >= 3:
            room = int(msg[1].decode("ascii"))
            self._pinned_failures[room] = msg[2].decode("utf-8")
            return None
        return msg

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        if bootstrap_addr in self.prefill_info_table:
            return True
        if not super().try_ensure_parallel_info(bootstrap_addr):
            return False
        verdict = self._fetch_prefill_verdict(bootstrap_addr)
        if verdict is None:  # not all prefill ranks registered yet: retry later
            self.prefill_info_table.pop(bootstrap_addr, None)
            return False
        with self._peer_lock:
            self._prefill_verdicts[bootstrap_addr] = verdict
        if verdict:
            logger.error("SpectrumKV: %s", verdict)
        else:
            logger.info(
                "SpectrumKV: prefill at %s verified (format v%s, protocol %s)",
                bootstrap_addr,
                format_version(),
                PROTOCOL_VERSION,
            )
        return True

    def _fetch_prefill_verdict(self, bootstrap_addr: str) -> str | None:
        """'' = compatible, reason = refuse, None = ask again later."""
        desc = f"prefill at {bootstrap_addr}"
        try:
            r = requests.get(f"http://{bootstrap_addr}/spectrum/info", timeout=5)
        except Exception as e:
            logger.warning("SpectrumKV: %s: cannot read /spectrum/info: %s", desc, e)
            return None
        if r.status_code == 404:
            self._prefill_is_spectrum[bootstrap_addr] = False
            return incompatibility(None, desc, "decode")
        if r.status_code != 200:
            return None
        ranks = r.json().get("ranks", [])
        info = self.prefill_info_table.get(bootstrap_addr)
        expected = (
            info.dp_size * info.attn_cp_size * info.attn_tp_size * info.pp_size if info else 1
        )
        if len(ranks) < expected:
            return None
        self._prefill_is_spectrum[bootstrap_addr] = True
        for peer in ranks:
            verdict = incompatibility(peer, desc, "decode")
            if verdict:
                return verdict
        return ""

    def prefill_verdict(self, bootstrap_addr: str) -> str:
        with self._peer_lock:
            return self._prefill_verdicts.get(bootstrap_addr, "")

    def prefill_is_spectrum(self, bootstrap_addr: str) -> bool:
        return self._prefill_is_spectrum.get(bootstrap_addr, False)


class SpectrumKVSender(MooncakeKVSender):
    def send(
        self,
        kv_indices: npt.NDArray[np.int32],
        state_indices: list[int] | None = None,
    ) -> None:
        # TODO(spectrum-packed): non-last chunk -> only remember the page indices
        # (they stay allocated and locked until the transfer finishes); last chunk
        # (self.curr_idx + len(kv_indices) == self.num_kv_indices) -> gather this
        # request's pages from self.kv_mgr.kv_pool, score, pack into a registered
        # send buffer and enqueue ONE bulk write to the decode receive buffer,
        # followed by the unchanged aux write and status sync. DESIGN.md §7.
        super().send(kv_indices, state_indices)

    def clear(self) -> None:
        self.kv_mgr._failed_rooms.discard(self.bootstrap_room)
        super().clear()

    def failure_exception(self):
        self.kv_mgr._failed_rooms.discard(self.bootstrap_room)
        return super().failure_exception()


class SpectrumKVReceiver(MooncakeKVReceiver):
    def init(self, prefill_dp_rank: int) -> None:
        reason = self.kv_mgr.prefill_verdict(self.bootstrap_addr)
        super().init(prefill_dp_rank)
        if reason and self.conclude_state is None:
            self._refuse(reason)

    def _refuse(self, reason: str) -> None:
        # Tell the prefill, so it frees the request now instead of holding it
        # until its bootstrap timeout (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT).
        room = str(self.bootstrap_room).encode("ascii")
        if self.kv_mgr.prefill_is_spectrum(self.bootstrap_addr):
            frames = [REJECT_HEADER, room, reason.encode("utf-8")]
        else:
            # An upstream prefill only understands room messages: a *dummy* one
            # (no destination indices, mooncake/conn.py:89-93) means "no KV wanted
            # from you"; it then finishes the request without transferring.
            frames = [
                room,
                self.kv_mgr.local_ip.encode("ascii"),
                str(self.kv_mgr.rank_port).encode("ascii"),
                self.session_id.encode("ascii"),
                b"",
                b"",
                b"",
                str(getattr(self, "required_dst_info_num", 1)).encode("ascii"),
            ]
        for info in getattr(self, "bootstrap_infos", None) or []:
            sock, lock = super()._connect_to_bootstrap_server(info)
            with lock:
                sock.send_multipart(frames)
        self.kv_mgr.record_failure(self.bootstrap_room, reason)
        self.conclude_state = KVPoll.Failed
        self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)

    def _connect_to_bootstrap_server(self, bootstrap_info: dict):
        sock, lock = super()._connect_to_bootstrap_server(bootstrap_info)
        return _TrailerSocket(sock, self.kv_mgr.identity_frames), lock

    def poll(self) -> int:
        # TODO(spectrum-packed): when the manager reports Success for this room and
        # the packed blob is not unpacked yet, unpack it here (scheduler thread)
        # into the preallocated slots req_to_token[req_pool_idx, :len] of
        # self.kv_mgr.kv_pool, free the receive region, then report Success;
        # until then report Transferring; codec error -> record_failure + Failed.
        return super().poll()

    def clear(self) -> None:
        self.kv_mgr._pinned_failures.pop(self.bootstrap_room, None)
        super().clear()


class SpectrumKVBootstrapServer(MooncakeKVBootstrapServer):
    """Mooncake bootstrap server + ``/spectrum/register`` and ``/spectrum/info``."""

    def __init__(self, host: str, port: int):
        self.spectrum_ranks: dict[str, dict[str, Any]] = {}
        super().__init__(host, port)

    def _setup_routes(self) -> None:
        super()._setup_routes()
        self.app.router.add_put("/spectrum/register", self._handle_spectrum_register)
        self.app.router.add_get("/spectrum/info", self._handle_spectrum_info)

    async def _handle_spectrum_register(self, request):
        from aiohttp import web

        data = await request.json()
        key = "/".join(
            str(data.get(k)) for k in ("attn_dp_rank", "attn_cp_rank", "attn_tp_rank", "pp_rank")
        )
        async with self.lock:
            self.spectrum_ranks[key] = data
        return web.Response(text="OK", status=200)

    async def _handle_spectrum_info(self, request):
        from aiohttp import web

        async with self.lock:
            ranks = list(self.spectrum_ranks.values())
        if not ranks:
            return web.Response(text="No SpectrumKV prefill rank registered yet.", status=503)
        return web.json_response({"server": wire_identity(), "ranks": ranks}, status=200)


_CLASSES: dict[Any, type] = {
    KVClassType.KVARGS: KVArgs,
    KVClassType.MANAGER: SpectrumKVManager,
    KVClassType.SENDER: SpectrumKVSender,
    KVClassType.RECEIVER: SpectrumKVReceiver,
    KVClassType.BOOTSTRAP_SERVER: SpectrumKVBootstrapServer,
}


def get_class(class_type: Any) -> type | None:
    """``get_kv_class`` answer for the spectrum backend."""
    return _CLASSES.get(class_type)
