"""Scheduler-startup hook: hand the KV pool to a SpectrumKV manager.

Upstream passes the pool tensors to a KV manager only under
``SGLANG_DISAGG_STAGING_BUFFER`` (``prefill.py:205-219``, ``decode.py:384-398``),
which SGLang refuses for non-mooncake backends. The packed path reads (prefill)
and writes (decode) the pool itself, so we wrap ``_init_kv_manager`` of
``PrefillBootstrapQueue`` (``prefill.py:134``) and ``DecodePreallocQueue``
(``decode.py:307``): after the manager is built, a manager that has
``attach_kv_pool`` gets ``(token_to_kv_pool, scheduler)``, then (prefill only)
the startup probe may run, then ``ready()`` runs the checks that need the pool
(no-drop floor for the resolved tier mode), registers the Mooncake arenas and
announces the server's identity (layout, tier mode) at the bootstrap server.
Other backends are untouched. Runtime equivalent of the ``attach_kv_pool``
lines of ``patches/0002-transfer-backend-plugin-registry.patch``.
"""

from __future__ import annotations

import functools
from typing import Any

_MARK = "_sglang_spectrum_attach"


def _wrap_init_kv_manager(queue_cls: type, pool_attr: str, is_prefill: bool) -> None:
    original = queue_cls._init_kv_manager
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _init_kv_manager(self):
        kv_manager = original(self)
        attach = getattr(kv_manager, "attach_kv_pool", None)
        if attach is None:
            return kv_manager
        attach(getattr(self, pool_attr), self.scheduler)
        if is_prefill:
            # PROBE-HOOK: the INT4-tolerance probe runs here, in the prefill
            # scheduler process at startup: the model and the KV pool exist, and
            # the tier mode it decides is announced to decode by ready() below.
            # The probe engineer adds exactly one call at this point:
            #     probe_hook.run_startup_probe(self.scheduler, self.scheduler.server_args)
            from .probe_hook import run_startup_probe

            run_startup_probe(self.scheduler, self.scheduler.server_args)
        kv_manager.ready()
        return kv_manager

    setattr(_init_kv_manager, _MARK, True)
    queue_cls._init_kv_manager = _init_kv_manager


def install_prefill(prefill_module: Any) -> None:
    """Hook for ``sglang.srt.disaggregation.prefill``."""
    _wrap_init_kv_manager(prefill_module.PrefillBootstrapQueue, "token_to_kv_pool", True)


def install_decode(decode_module: Any) -> None:
    """Hook for ``sglang.srt.disaggregation.decode``."""
    _wrap_init_kv_manager(decode_module.DecodePreallocQueue, "token_to_kv_pool", False)
