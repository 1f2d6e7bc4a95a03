"""Test helpers around :mod:`sglang_spectrum.sglang_plugin.launch` (real PD deployments).

The process management (free ports, process groups stopped by PID, health
waits, log tails) lives in the package, shared with ``spectrumkv demo`` and
``bench/serving.py``; this module re-exports it and adds the pytest helper.
"""

from __future__ import annotations

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
    "start_deployment",
    "tail",
]


def start_deployment(request: Any, **kwargs: Any) -> PDDeployment:
    """Pytest helper: start a deployment whose stop() is registered as a finalizer first."""
    d = PDDeployment(**kwargs)
    request.addfinalizer(d.stop)
    return d.start()
