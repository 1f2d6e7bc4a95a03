"""Decode side of the ``spectrum`` KV manager: prefill verification, ``Sent`` handling.

A mixin of :class:`.manager.SpectrumKVManager`. The control thread hands each
``Sent``/``Failed``/``AbortAck`` to the request's receiver
(:mod:`.endpoints`), which unpacks through :meth:`DecodeSide.unpack_into_pool`
(:func:`sglang_spectrum.transfer.unpack_request`) off the scheduler loop.
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

from . import messages
from .identity import incompatibility, layout_desc
from .options import SpectrumServerOptions, options_from_dict
from .transport import write_aux_row

logger = logging.getLogger(__name__)

ABORT_ACK_TIMEOUT_S = 60.0  # decode: keep an aborted region at most this long without ack
FOREIGN_ABORT_REPEATS_S = (1.0, 3.0, 10.0)  # resend SGLang's ABORT to a foreign prefill at


class DecodeSide:
    """Decode-side behaviour of the manager (see the module docstring)."""

    def register_receiver(self, room: int, receiver: Any) -> None:
        with self._lock:
            self._receivers[room] = receiver

    def unregister_receiver(self, room: int, receiver: Any) -> None:
        with self._lock:
            if self._receivers.get(room) is receiver:
                del self._receivers[room]

    def repeat_foreign_abort(self, notify: Callable[[], None]) -> None:
        """Call ``notify`` again :data:`FOREIGN_ABORT_REPEATS_S` seconds from now (control
        thread): a prefill of another backend forgets an ABORT that beats its request."""
        with self._lock:
            self._foreign_aborts.append((time.monotonic(), notify))

    def _sweep_aborted(self) -> None:
        """Free the regions of aborted requests whose prefill never acknowledged, and
        repeat due ABORTs to foreign prefills."""
        with self._lock:
            receivers = list(self._receivers.values())
        for receiver in receivers:
            receiver.expire_abort(ABORT_ACK_TIMEOUT_S)
        now = time.monotonic()
        with self._lock:
            due = [
                (t0, f)
                for t0, f in self._foreign_aborts
                if any(self._last_sweep < t0 + d <= now for d in FOREIGN_ABORT_REPEATS_S)
            ]
            self._foreign_aborts = [
                (t0, f) for t0, f in self._foreign_aborts if now < t0 + FOREIGN_ABORT_REPEATS_S[-1]
            ]
            self._last_sweep = now
        for _, notify in due:
            try:
                notify()
            except Exception as e:  # best effort, like SGLang's own notification
                logger.debug("SpectrumKV: repeated abort notification failed: %s", e)

    def _on_decode_message(self, msg: Any) -> None:
        with self._lock:
            receiver = self._receivers.get(msg.room)
        if receiver is None:
            logger.debug("SpectrumKV: %s for unknown room %s dropped", type(msg).__name__, msg.room)
            return
        if isinstance(msg, messages.Sent):
            receiver.on_sent(msg)
        elif isinstance(msg, messages.Failed):
            receiver.on_failed(msg.reason)
        elif isinstance(msg, messages.AbortAck):
            receiver.on_abort_ack()

    def unpack_into_pool(self, buf: torch.Tensor, slots: np.ndarray, checksum: int) -> Any:
        """Decode control thread: validate and unpack one part of a request into the
        pool slots ``slots`` (int64 ``[T]``)."""
        from sglang_spectrum.transfer import unpack_request

        device = self.k_pools[0].device
        slots_t = torch.from_numpy(slots).to(device)
        stream = None
        if device.type == "cuda":  # the control thread's own stream, made once
            stream = self._unpack_stream = getattr(self, "_unpack_stream", None) or (
                torch.cuda.Stream(device)
            )
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return unpack_request(
                buf, self.k_pools, self.v_pools, slots_t, expected_checksum=checksum
            )

    def write_aux(self, index: int, rows: list[bytes]) -> None:
        write_aux_row(self.kv_args.aux_data_ptrs, self.kv_args.aux_item_lens, index, rows)

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        if bootstrap_addr in self._prefill_verdicts:
            return super().try_ensure_parallel_info(bootstrap_addr)
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
            self._foreign_prefills.add(bootstrap_addr)
            return incompatibility(None, desc, "decode")
        if r.status_code != 200:
            return None
        ranks = r.json().get("ranks", [])
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
        if ranks:
            self._prefill_peers[bootstrap_addr] = ranks[0]
        return ""

    def prefill_is_foreign(self, bootstrap_addr: str) -> bool:
        return bootstrap_addr in self._foreign_prefills

    def prefill_verdict(self, bootstrap_addr: str) -> str:
        with self._lock:
            return self._prefill_verdicts.get(bootstrap_addr, "")

    def receive_bound(self, bootstrap_addr: str, num_tokens: int) -> int:
        """Receive-region bytes for ``num_tokens`` tokens from the prefill at
        ``bootstrap_addr``: its :meth:`~.options.SpectrumServerOptions.bound_codec` and a
        part per chunk it streams."""
        peer = self._prefill_peers.get(bootstrap_addr) or {}
        announced = peer.get("options")
        # (an unverified prefill: the largest bound, everything at FP16)
        opts = options_from_dict(announced) if announced else SpectrumServerOptions(budget=1.0)
        chunk = int(peer.get("stream_chunk_tokens") or 0)
        return self.region_bound(num_tokens, opts.bound_codec(), chunk)
