"""Test-only fault injection and delays on the prefill side (environment switches).

* ``SGLANG_SPECTRUM_FAULT=corrupt|header|truncate|stale``: the *first* packed
  request of this server gets that fault (one payload byte flipped -> payload
  checksum mismatch; one header byte flipped -> header checksum mismatch; only
  half of the buffer written -> truncated buffer; the buffer announced with
  another checksum -> stale/foreign data); every other request is untouched.
* ``SGLANG_SPECTRUM_FAULT=rid``: a request whose rid contains
  ``spectrum-fault-<mode>`` gets ``<mode>`` in its final part (several faults on one
  deployment); ``spectrum-fault-early-<mode>``: in every earlier part that carries
  the rid (a layer-pipelined request's groups), which the decode unpacks on landing.
* ``SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S=S``: wait S seconds before the Mooncake
  write of a request whose rid contains ``spectrum-delay`` (kill/abort tests).
"""

from __future__ import annotations

import os

import torch

FAULT_ENV = "SGLANG_SPECTRUM_FAULT"
FAULT_MODES = ("corrupt", "header", "truncate", "stale")
TEST_DELAY_ENV = "SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S"


def fault_for(rid: str | None, counter: list[int], final: bool = True) -> str | None:
    """The fault mode for this part of a request (``final``: its last part), or None
    (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV, "").strip().lower()
    if not spec:
        return None
    if spec == "rid":
        early = "" if final else "early-"
        for mode in FAULT_MODES:
            if rid and f"spectrum-fault-{early}{mode}" in rid:
                return mode
        return None
    if spec in FAULT_MODES and final:
        counter[0] += 1
        return spec if counter[0] == 1 else None
    return None


def inject(fault: str, view: torch.Tensor, nbytes: int, checksum: int) -> tuple[int, int]:
    """Damage a packed buffer in place; returns the (bytes to write, checksum to announce)."""
    if fault == "corrupt":
        from sglang_spectrum.codec import HEADER_ALIGN, PREFIX

        header_len = PREFIX.unpack(view[: PREFIX.size].cpu().numpy().tobytes())[3]
        head = -(-(PREFIX.size + header_len) // HEADER_ALIGN) * HEADER_ALIGN
        pos = head + (nbytes - head) // 2  # inside the payload
        view[pos] = view[pos] ^ 0x5A
    elif fault == "header":
        view[20] = view[20] ^ 0x5A  # inside the msgpack header (CRC-checked)
    elif fault == "truncate":
        return max(nbytes // 2, 1), checksum
    elif fault == "stale":
        return nbytes, checksum ^ 1
    return nbytes, checksum


def test_delay_s(rid: str | None) -> float:
    """Seconds to wait before the write of this request (0 unless the switch is set)."""
    try:
        delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    except ValueError:
        return 0.0
    return delay if delay > 0 and rid and "spectrum-delay" in rid else 0.0
