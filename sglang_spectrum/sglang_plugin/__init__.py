"""SGLang integration of SpectrumKV (the only SGLang-specific code of the project).

SGLang (>= 0.5.14) loads :func:`.plugin.register` through the entry point
``spectrumkv`` of the group ``sglang.srt.plugins`` in the launcher, the Engine
and every scheduler process. It registers:

* ``--disaggregation-transfer-backend spectrum`` (choice, enum value,
  ``get_kv_class`` dispatch to :mod:`.manager` / :mod:`.endpoints`),
* the ``--spectrum-*`` options (:mod:`.options`),
* the KV-pool hand-over to our KV manager at scheduler start.

One job per module: :mod:`.compat` (every SGLang-version difference),
:mod:`.options`, :mod:`.plugin` (registration), :mod:`.identity`,
:mod:`.messages` and :mod:`.transport` (the wire), :mod:`.manager` (+ :mod:`.prefill_side`,
:mod:`.decode_side`) and
:mod:`.endpoints` (SGLang's ``Common*`` contract), :mod:`.metrics`,
:mod:`.probe_hook` / :mod:`.sglang_engine` (startup probe), :mod:`.launch` /
:mod:`.demo` (deployments). Packing and unpacking are SGLang-free:
:mod:`sglang_spectrum.transfer`.

Set ``SGLANG_SPECTRUM_DISABLE=1`` to turn all of it off (SGLang then runs
unmodified). This module must stay import-light.
"""

from __future__ import annotations

BACKEND_NAME = "spectrum"
DISABLE_ENV = "SGLANG_SPECTRUM_DISABLE"
# Version of the plugin's own bootstrap/ZMQ protocol (independent of the codec's
# FORMAT_VERSION; both are exchanged and must match).
PROTOCOL_VERSION = 4

__all__ = ["BACKEND_NAME", "DISABLE_ENV", "PROTOCOL_VERSION"]
