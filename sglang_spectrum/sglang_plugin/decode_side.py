"""Decode side of the ``spectrum`` KV manager: prefill verification, ``Sent`` handling,
deferred grants and the housekeeping sweep.

A mixin of :class:`.manager.SpectrumKVManager`. The control thread hands each
``Landed``/``Sent``/``Failed``/``AbortAck`` to the receiver of that room *and generation*
(:mod:`.endpoints`), which unpacks through :meth:`DecodeSide.unpack_into_pool`
(:func:`sglang_spectrum.transfer.unpack_request`) off the scheduler loop. Every
:data:`SWEEP_INTERVAL_S`, under any traffic, :meth:`DecodeSide.sweep` frees the
regions of aborts the prefill never acknowledged, retries grants deferred by a
full arena (oldest first) and fails those that waited too long.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import requests
import torch

from . import compat, messages
from .identity import incompatibility, layout_desc
from .options import SpectrumOptionError, SpectrumServerOptions, options_from_dict

logger = logging.getLogger(__name__)

FOREIGN_ABORT_REPEATS_S = (1.0, 3.0, 10.0)  # resend SGLang's ABORT to a foreign prefill at
SWEEP_INTERVAL_S = 0.5


class DecodeSide:
    """Decode-side behaviour of the manager (see the module docstring)."""

    def _init_decode(self) -> None:
        self._receivers: dict[tuple[int, int], Any] = {}  # (room, generation) -> receiver
        self._deferred: list[Any] = []  # receivers waiting for arena room, oldest first
        self._prefill_verdicts: dict[str, str] = {}  # bootstrap addr -> '' | reason
        self._prefill_peers: dict[str, dict[str, Any]] = {}  # addr -> identity (+ instance)
        self._foreign_prefills: set[str] = set()  # prefills of another backend
        self._foreign_aborts: list[tuple[float, Callable[[], None]]] = []
        self._last_foreign = 0.0
        self._grants_to_publish: dict[int, messages.Grant] = {}  # room -> grant being sent

    # ------------------------------------------------------------------ Common's hooks

    def build_receiver_registration_message(self) -> list[bytes]:
        """``CommonKVManager``'s hook: what a receiver sends each prefill rank once per
        connection (``CommonKVReceiver._register_kv_args``): this rank's session and
        identity."""
        port = int(self.rank_port)
        msg = messages.Register(self.session_id, self.local_ip, port, self.identity())
        return messages.encode(msg)

    def build_receiver_metadata_message(self, *, bootstrap_room: int, **kwargs: Any) -> list[bytes]:
        """``CommonKVManager``'s hook: what ``CommonKVReceiver.send_metadata`` sends each
        prefill rank: the receiver's :class:`.messages.Grant` of its reserved region
        (the same for every rank; set by :meth:`publish_grant`, SGLang's page indices
        are in it as ``num_pages``)."""
        return messages.encode(self._grants_to_publish[bootstrap_room])

    @contextlib.contextmanager
    def publish_grant(self, grant: messages.Grant) -> Any:
        """While SGLang's ``send_metadata`` runs, :meth:`build_receiver_metadata_message`
        answers ``grant`` for its room."""
        self._grants_to_publish[grant.room] = grant
        try:
            yield
        finally:
            self._grants_to_publish.pop(grant.room, None)

    # ------------------------------------------------------------------ receivers

    def register_receiver(self, receiver: Any) -> None:
        with self._lock:
            self._receivers[(receiver.bootstrap_room, receiver.state.generation)] = receiver

    def unregister_receiver(self, receiver: Any) -> None:
        with self._lock:
            key = (receiver.bootstrap_room, receiver.state.generation)
            if self._receivers.get(key) is receiver:
                del self._receivers[key]
        self.unregister_deferred(receiver)

    def unregister_deferred(self, receiver: Any) -> None:
        with self._lock:
            if receiver in self._deferred:
                self._deferred.remove(receiver)

    def defer(self, receiver: Any) -> None:
        with self._lock:
            if receiver not in self._deferred:
                self._deferred.append(receiver)

    def retry_deferred(self) -> None:
        """Offer freed arena room to the deferred grants, oldest first."""
        with self._lock:
            waiting = list(self._deferred)
        for receiver in waiting:
            outcome = receiver.retry_grant()
            if outcome == "deferred":
                break  # keep the order: the oldest gets the next free region
            with self._lock:
                if receiver in self._deferred:
                    self._deferred.remove(receiver)

    def repeat_foreign_abort(self, notify: Callable[[], None]) -> None:
        """Call ``notify`` again :data:`FOREIGN_ABORT_REPEATS_S` seconds from now (control
        thread): a prefill of another backend forgets an ABORT that beats its request."""
        with self._lock:
            self._foreign_aborts.append((time.monotonic(), notify))

    def sweep(self) -> None:
        """Free overdue aborted regions, retry/expire deferred grants, repeat foreign
        ABORTs (control thread, every :data:`SWEEP_INTERVAL_S`)."""
        with self._lock:
            receivers = list(self._receivers.values())
        for receiver in receivers:
            receiver.expire_abort()
        self.retry_deferred()
        with self._lock:
            expired = [r for r in self._deferred if r.state.defer_expired()]
        for receiver in expired:
            receiver.retry_grant()  # fails it with the reason
        now = time.monotonic()
        with self._lock:
            due = [
                f
                for t0, f in self._foreign_aborts
                if any(self._last_foreign < t0 + d <= now for d in FOREIGN_ABORT_REPEATS_S)
            ]
            self._foreign_aborts = [
                (t0, f) for t0, f in self._foreign_aborts if now < t0 + FOREIGN_ABORT_REPEATS_S[-1]
            ]
            self._last_foreign = now
        for notify in due:
            try:
                notify()
            except Exception as e:  # best effort, like SGLang's own notification
                logger.debug("SpectrumKV: repeated abort notification failed: %s", e)

    def decode_sizes(self) -> dict[str, int]:
        """Sizes of the decode's own per-request tables."""
        with self._lock:
            return {"receivers": len(self._receivers), "deferred": len(self._deferred)}

    def _on_decode_message(self, msg: Any) -> None:
        with self._lock:
            receiver = self._receivers.get((msg.room, msg.generation))
        if receiver is None:
            logger.debug(
                "SpectrumKV: %s for room %s (generation %x) dropped: no such receiver",
                type(msg).__name__,
                msg.room,
                msg.generation,
            )
            return
        if isinstance(msg, messages.Landed):
            receiver.on_landed(msg)
        elif isinstance(msg, messages.Sent):
            receiver.on_sent(msg)
        elif isinstance(msg, messages.Failed):
            if msg.stale_peer:
                self.forget_prefill(receiver.bootstrap_addr)
            receiver.on_failed(msg.reason)
        elif isinstance(msg, messages.AbortAck):
            receiver.on_abort_ack(msg.generation)

    def unpack_into_pool(
        self,
        buf: torch.Tensor,
        slots: np.ndarray,
        checksum: int,
        layers: tuple[int, int] | None = None,
    ) -> Any:
        """Decode control thread: validate and unpack one part of a request into the
        pool slots ``slots`` (int64 ``[T]``), of layers ``[l0, l1)`` (a layer group's
        part) or all of them."""
        from sglang_spectrum.transfer import unpack_request

        device = self.k_pools[0].device
        stream = None
        if device.type == "cuda":  # the control thread's own stream, made once
            stream = self._unpack_stream = getattr(self, "_unpack_stream", None) or (
                torch.cuda.Stream(device)
            )
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            # (on this stream: a copy on the legacy default one waits for the forward)
            slots_t = torch.from_numpy(slots).to(device)
            l0, l1 = layers or (0, len(self.k_pools))
            fp8 = self.fp8 if self.fp8 is None else self.fp8.layers(l0, l1)
            return unpack_request(
                buf,
                self.k_pools[l0:l1],
                self.v_pools[l0:l1],
                slots_t,
                expected_checksum=checksum,
                fp8=fp8,
            )

    def write_aux(self, index: int, rows: list[bytes]) -> None:
        self.aux_rows.write(index, rows)

    # ------------------------------------------------------------------ prefill peers

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        if bootstrap_addr in self._prefill_verdicts:
            return super().try_ensure_parallel_info(bootstrap_addr)
        with compat.peer_kv_dtype(self, bootstrap_addr):  # we pair dtypes ourselves
            if not super().try_ensure_parallel_info(bootstrap_addr):
                return False
        verdict = self._fetch_prefill_verdict(bootstrap_addr)
        if verdict is None:  # not every prefill rank registered yet: ask again later
            self.prefill_info_table.pop(bootstrap_addr, None)
            return False
        with self._lock:
            self._prefill_verdicts[bootstrap_addr] = verdict
        if verdict:
            logger.error("SpectrumKV: %s", verdict)
        else:
            peer = self._prefill_peers.get(bootstrap_addr, {})
            logger.info(
                "SpectrumKV: prefill at %s verified (layout %s, tiers %s, options %s)",
                bootstrap_addr,
                layout_desc(peer.get("layout") or {}),
                peer.get("tiers_resolved"),
                peer.get("options"),
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
            with self._lock:
                self._foreign_prefills.add(bootstrap_addr)
            return incompatibility(None, desc, "decode")
        if r.status_code != 200:
            return None
        body = r.json()
        ranks = body.get("ranks", [])
        info = self.prefill_info_table.get(bootstrap_addr)
        expected = getattr(info, "attn_tp_size", 1) * getattr(info, "dp_size", 1) if info else 1
        if len(ranks) < expected:
            return None
        for peer in ranks:
            verdict = incompatibility(peer, desc, "decode", self.identity())
            if verdict:
                return verdict
        if info is not None and getattr(info, "attn_tp_size", None) not in (
            None,
            self.attn_tp_size,
        ):
            return incompatibility(
                dict(ranks[0], attn_tp_size=info.attn_tp_size), desc, "decode", self.identity()
            )
        peer = dict(ranks[0]) if ranks else {}
        try:  # the receive bound is computed from these on the scheduler thread
            options_from_dict(peer.get("options") or {})
        except (SpectrumOptionError, TypeError, ValueError) as e:
            return (
                f"SpectrumKV: {desc} announces options this decode cannot read ({e}); run the"
                " same sglang-spectrum version on prefill and decode"
            )
        peer["instance"] = str((body.get("server") or {}).get("instance", ""))
        with self._lock:
            self._prefill_peers[bootstrap_addr] = peer
        self._check_arena_for(bootstrap_addr, desc, peer.get("options") or {})
        return ""

    def _check_arena_for(self, bootstrap_addr: str, desc: str, announced: dict) -> None:
        """Warn once per verified prefill whose longest request would not fit the receive
        arena: the decode sized it from its own ``--spectrum-*`` flags at startup, before
        it knew the prefill's ``announced`` options (such requests fail with a one-line
        error naming the flag)."""
        if self.arena is None or not self.longest_tokens:
            return
        need = self.receive_bound(bootstrap_addr, self.longest_tokens)
        if need <= self.arena.size:
            return
        logger.warning(
            "SpectrumKV: %s packs the longest request (%d tokens) into up to %.0f MiB, more"
            " than this decode's %.0f MiB receive arena: such requests will fail. Start the"
            " decode with the prefill's --spectrum-budget %s (the arena is sized from it)"
            " or set --spectrum-arena-mb %.0f",
            desc,
            self.longest_tokens,
            need / (1 << 20),
            self.arena.size / (1 << 20),
            "auto" if announced.get("budget_mode") == "auto" else announced.get("budget"),
            need / (1 << 20) + 1,
        )

    def forget_prefill(self, bootstrap_addr: str) -> None:
        """Drop what this decode knows about a prefill (it restarted or is gone): the
        next request verifies it again."""
        with self._lock:
            self._prefill_verdicts.pop(bootstrap_addr, None)
            self._prefill_peers.pop(bootstrap_addr, None)
            self._foreign_prefills.discard(bootstrap_addr)
        self.prefill_info_table.pop(bootstrap_addr, None)
        with self.connection_lock:  # SGLang's cached rank list of that prefill
            for key in [k for k in self.connection_pool if str(k).startswith(bootstrap_addr + "_")]:
                del self.connection_pool[key]

    def _handle_node_failure(self, failed_bootstrap_addr: str) -> None:
        super()._handle_node_failure(failed_bootstrap_addr)
        self.forget_prefill(failed_bootstrap_addr)

    def prefill_is_foreign(self, bootstrap_addr: str) -> bool:
        with self._lock:
            return bootstrap_addr in self._foreign_prefills

    def prefill_verdict(self, bootstrap_addr: str) -> str:
        with self._lock:
            return self._prefill_verdicts.get(bootstrap_addr, "")

    def prefill_instance(self, bootstrap_addr: str) -> str:
        with self._lock:
            return str((self._prefill_peers.get(bootstrap_addr) or {}).get("instance", ""))

    def receive_bound(self, bootstrap_addr: str, num_tokens: int) -> int:
        """Receive-region bytes for ``num_tokens`` tokens from the prefill at
        ``bootstrap_addr``: its :meth:`~.options.SpectrumServerOptions.bound_codec` at
        the tier mode its probe resolved and a part per chunk it streams (options
        checked when the prefill was verified)."""
        with self._lock:
            peer = self._prefill_peers.get(bootstrap_addr) or {}
        announced = peer.get("options")
        # (an unverified prefill: the largest bound, everything at FP16)
        opts = options_from_dict(announced) if announced else SpectrumServerOptions(budget=1.0)
        chunk = int(peer.get("stream_chunk_tokens") or 0)
        dtype = (peer.get("layout") or {}).get("dtype")  # what the prefill packs from
        codec = opts.bound_codec(peer.get("tiers_resolved"))
        groups = opts.layer_groups(self.layout["layers"])  # parts a chunk
        return self.region_bound(num_tokens, codec, chunk, dtype, groups=groups)
