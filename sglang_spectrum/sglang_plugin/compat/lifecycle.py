"""The ``Common*`` lifecycle 0.5.23 has and 0.5.17 leaves as stubs, for the backend's
sender and receiver to mix in before ``CommonKVSender`` / ``CommonKVReceiver``:
:data:`SenderLifecycle` and :data:`ReceiverLifecycle` (empty on 0.5.23). See the
package docstring."""

from __future__ import annotations

import time
from typing import Any

from .version import sglang_version


def _raise_failure(endpoint: Any) -> None:
    """0.5.23's ``CommonKVSender``/``CommonKVReceiver.failure_exception``
    (``common/conn.py``:2446, :2944; 0.5.17's raise a placeholder): conclude as failed,
    clear, raise SGLang's error with the recorded reason (none recorded: another rank
    failed the request)."""
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.common.conn import KVTransferError

    endpoint.conclude_state = KVPoll.Failed
    endpoint.clear()
    with endpoint.kv_mgr.failure_lock:
        reason = endpoint.kv_mgr.failure_records.pop(endpoint.bootstrap_room, None)
    raise KVTransferError(
        endpoint.bootstrap_room,
        reason or "Failed due to an unknown reason from another rank",
        is_from_another_rank=reason is None,
    )


class _SenderLifecycle0517:
    """0.5.23's ``CommonKVSender.send``/``poll``/``failure_exception``
    (``common/conn.py``:2303-2456, without its staging, PP-consensus and tracing
    parts, which the backend refuses or lacks), for 0.5.17, whose ``CommonKVSender``
    leaves them as stubs (``common/conn.py``:1196-1227). Mixed in before
    ``CommonKVSender``; uses only what 0.5.17's has (``_prepare_send_indices``,
    ``_record_transfer_indices``, ``_check_bootstrap_timeout``)."""

    def send(self, kv_indices: Any, state_indices: Any = None, num_kv_tokens: Any = None,
             **kwargs: Any) -> None:  # fmt: skip
        from sglang.srt.disaggregation.base.conn import KVPoll

        if self.conclude_state in (KVPoll.Success, KVPoll.Failed):
            return
        kv_indices, index_slice, is_last, skip = self._prepare_send_indices(
            kv_indices, state_indices
        )
        if skip:
            return
        self.kv_mgr.add_transfer_request(
            self.bootstrap_room,
            kv_indices,
            index_slice,
            is_last,
            aux_index=self.aux_index if is_last else None,
            state_indices=state_indices if is_last else None,
            num_kv_tokens=num_kv_tokens,
        )
        self._record_transfer_indices(kv_indices, state_indices)

    def poll(self) -> Any:
        from sglang.srt.disaggregation.base.conn import KVPoll

        if self.conclude_state is not None:
            return self.conclude_state
        room = self.bootstrap_room
        status = (
            self.kv_mgr.check_status(room) if room in self.kv_mgr.request_status else KVPoll.Failed
        )
        if status == KVPoll.Bootstrapping:
            status = self._check_bootstrap_timeout() or status
        if status in (KVPoll.Success, KVPoll.Failed):
            self.conclude_state = status
        return status

    def failure_exception(self) -> None:
        _raise_failure(self)


class _SenderLifecycle0523:
    """0.5.23: ``CommonKVSender`` has the whole lifecycle; nothing to add."""


SenderLifecycle: type = (
    _SenderLifecycle0517 if sglang_version() == "0.5.17" else _SenderLifecycle0523
)


class _ReceiverLifecycle0517:
    """0.5.23's ``CommonKVReceiver._register_kv_args``, ``_send_bootstrap_message``,
    ``send_metadata`` (``common/conn.py``:2802-2886, without staging and host
    destinations, which the backend refuses) and ``failure_exception`` for 0.5.17,
    whose ``_register_kv_args`` does nothing, whose ``send_metadata`` raises
    (``common/conn.py``:1444-1454) and whose ``failure_exception`` raises a placeholder."""

    def _register_kv_args(self) -> bool:
        if self.bootstrap_infos is None:
            return False
        message = self.kv_mgr.build_receiver_registration_message()
        return all(
            self._send_bootstrap_message(info, message, "_register_kv_args")
            for info in self.bootstrap_infos
        )

    def _send_bootstrap_message(self, info: dict, message: list, operation: str) -> bool:
        import zmq
        from sglang.srt.disaggregation.base.conn import KVPoll

        try:
            sock, lock = self._connect_to_bootstrap_server(info)
            with lock:
                sock.send_multipart(message)
        except zmq.ZMQError:
            self.kv_mgr.record_failure(
                self.bootstrap_room,
                f"{operation} to prefill {info.get('rank_ip')}:{info.get('rank_port')} failed",
            )
            self.conclude_state = KVPoll.Failed
            self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)
            return False
        return True

    def send_metadata(self, kv_indices: Any, aux_index: Any = None, state_indices: Any = None,
                      decode_prefix_len: Any = None, **kwargs: Any) -> None:  # fmt: skip
        from sglang.srt.disaggregation.base.conn import KVPoll

        if self.bootstrap_infos is None:
            self.kv_mgr.record_failure(
                self.bootstrap_room,
                f"Could not fetch prefill parallel info from bootstrap_addr: {self.bootstrap_addr}",
            )
            self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)
            return
        for info in self.bootstrap_infos:
            message = self.kv_mgr.build_receiver_metadata_message(
                bootstrap_room=self.bootstrap_room,
                required_dst_info_num=getattr(self, "required_dst_info_num", 1),
                kv_indices=kv_indices,
                aux_index=aux_index,
                state_indices=state_indices,
                decode_prefix_len=decode_prefix_len,
                is_dummy=bool(info.get("is_dummy", False)),
            )
            if not self._send_bootstrap_message(info, message, "send_metadata"):
                return
        self.init_time = time.time()

    def failure_exception(self) -> None:
        _raise_failure(self)


class _ReceiverLifecycle0523:
    """0.5.23: ``CommonKVReceiver`` has them; nothing to add."""


ReceiverLifecycle: type = (
    _ReceiverLifecycle0517 if sglang_version() == "0.5.17" else _ReceiverLifecycle0523
)
