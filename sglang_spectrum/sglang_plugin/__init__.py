"""SGLang integration of SpectrumKV (the only SGLang-specific code of the project).

After ``pip install`` the file ``sglang_spectrum_autoload.pth`` makes every Python
process install a tiny import hook (:mod:`.autoload`). When SGLang's
``server_args`` / ``disaggregation`` modules are imported (in the launcher and in
every spawned scheduler process) the hook registers:

* ``--disaggregation-transfer-backend spectrum`` (enum value, ``get_kv_class``
  dispatch, argparse choice),
* the ``--spectrum-*`` options (:mod:`.options`),
* the KV-pool hand-over to our KV manager at scheduler start (:mod:`.startup`).

Set ``SGLANG_SPECTRUM_DISABLE=1`` to turn all of it off (SGLang then runs
unmodified). See ``DESIGN.md`` next to this file for the SGLang internals used.

This module must stay import-light: it is imported by the hooks only, never at
interpreter start.
"""

from __future__ import annotations

BACKEND_NAME = "spectrum"
DISABLE_ENV = "SGLANG_SPECTRUM_DISABLE"
PTH_NAME = "sglang_spectrum_autoload.pth"
# Version of the plugin's own bootstrap/ZMQ protocol (independent of the codec's
# FORMAT_VERSION; both are exchanged and must match).
PROTOCOL_VERSION = 1


def activate() -> bool:
    """Register the backend now, also into SGLang modules that are already imported.

    For processes without the ``.pth`` file (or started before installation).
    Returns True if the plugin is active.
    """
    from . import autoload

    return autoload.activate()


__all__ = ["BACKEND_NAME", "DISABLE_ENV", "PROTOCOL_VERSION", "PTH_NAME", "activate"]
