"""Test helpers around :mod:`sglang_spectrum.sglang_plugin.launch` (real PD deployments).

The process management (free ports, process groups stopped by PID, health
waits, log tails) lives in the package, shared with ``spectrumkv demo`` and
``bench/serving.py``; this module re-exports it and adds the pytest helper.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sglang_spectrum.sglang_plugin.launch import (
    CPU_ENV,
    CPU_FLAGS,
    HOST,
    DeploymentError,
    ManagedProcess,
    PDDeployment,
    SingleServer,
    free_port,
    tail,
)
from sglang_spectrum.sglang_plugin.launch import SERVER_FLAGS as _HOST_FLAGS

# what one CPU server always gets (device, host, KV cap)
SERVER_FLAGS = [*CPU_FLAGS, *_HOST_FLAGS]

__all__ = [
    "CPU_ENV",
    "HOST",
    "SERVER_FLAGS",
    "DeploymentError",
    "ManagedProcess",
    "PDDeployment",
    "SingleServer",
    "free_port",
    "start_delayed_request",
    "start_deployment",
    "tail",
]


def start_deployment(request: Any, **kwargs: Any) -> PDDeployment:
    """Pytest helper: start a deployment whose stop() is registered as a finalizer first."""
    d = PDDeployment(**kwargs)
    request.addfinalizer(d.stop)
    return d.start()


def start_delayed_request(
    d: PDDeployment, prompt: str, rid: str, max_new_tokens: int, timeout_s: float
) -> tuple[threading.Thread, dict]:
    """Send a request whose transfer the prefill delays (rid contains ``spectrum-delay``,
    ``SGLANG_SPECTRUM_TEST_TRANSFER_DELAY_S`` set) and return once it is packed and
    waiting for its write: (the client thread, its result dict: ``r`` or ``e``)."""
    result: dict = {}

    def run() -> None:
        try:
            result["r"] = d.generate(
                prompt, max_new_tokens=max_new_tokens, rid=rid, timeout_s=timeout_s
            )
        except Exception as e:  # what the client sees
            result["e"] = e

    thread = threading.Thread(target=run)
    thread.start()
    plog = d.proc("prefill").log_path
    deadline = time.monotonic() + 120
    while "transfer starts in" not in plog.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the delayed transfer never started"
        time.sleep(0.2)
    return thread, result
