"""The tier mode in force in this server process (``--spectrum-tiers auto|3|2``).

``auto`` is resolved by the INT4-tolerance probe at scheduler startup (see
``run_startup_probe``); until a decision exists, and whenever the probe cannot
run, the safe 2-tier mode (FP16+INT8) is used.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_decision: dict[str, Any] = {}


def set_decision(tiers: str, evidence: dict[str, Any] | None = None) -> None:
    """Record the probe's decision ("3" or "2") for this process."""
    if tiers not in ("3", "2"):
        raise ValueError(f"tier decision must be '3' or '2', got {tiers!r}")
    with _lock:
        _decision.clear()
        _decision.update({"tiers": tiers, **(evidence or {})})


def decision() -> dict[str, Any]:
    """The recorded decision and its evidence (empty if none)."""
    with _lock:
        return dict(_decision)


def resolved_tiers(option: str) -> str:
    """The tiers to pack with: the option itself for "3"/"2", the probe's decision for "auto"."""
    if option in ("3", "2"):
        return option
    with _lock:
        return _decision.get("tiers", "2")
