"""Import hook that activates the SpectrumKV SGLang plugin in every process.

``sglang_spectrum_autoload.pth`` loads this file at interpreter start *as a
standalone module* (it must not import the ``sglang_spectrum`` package, which
pulls torch): stdlib only, no logging, no sglang. It puts one finder at the
front of ``sys.meta_path``. The finder ignores every module except the four
SGLang modules below; for those it wraps the real loader so that, right after
the module body has executed, the matching hook of this plugin runs. Hooks are
idempotent; an exception in a hook is logged as one warning and SGLang keeps
running unmodified.

``SGLANG_SPECTRUM_DISABLE=1`` turns the whole mechanism off (checked by the
``.pth`` line and again here).
"""

from __future__ import annotations

import os
import sys

DISABLE_ENV = "SGLANG_SPECTRUM_DISABLE"
_PLUGIN = "sglang_spectrum.sglang_plugin"
# SGLang module -> (plugin module, function) run right after it was imported
HOOKS: dict[str, tuple[str, str]] = {
    "sglang.srt.server_args": (f"{_PLUGIN}.options", "install"),
    "sglang.srt.disaggregation.utils": (f"{_PLUGIN}.registry", "install"),
    "sglang.srt.disaggregation.prefill": (f"{_PLUGIN}.startup", "install_prefill"),
    "sglang.srt.disaggregation.decode": (f"{_PLUGIN}.startup", "install_decode"),
}


def is_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(msg: str) -> None:
    import logging

    logging.getLogger(_PLUGIN).warning("sglang_spectrum: %s", msg)


def run_hook(module_name: str, module: object) -> bool:
    """Run the plugin hook for an imported SGLang module; never raises."""
    target = HOOKS.get(module_name)
    if target is None:
        return False
    try:
        import importlib

        hook = getattr(importlib.import_module(target[0]), target[1])
        hook(module)
        return True
    except Exception as e:  # a broken plugin must never break SGLang
        _warn(
            f"plugin disabled for {module_name} ({type(e).__name__}: {e}); "
            f"SGLang runs without the '{_PLUGIN.split('.')[0]}' transfer backend"
        )
        return False


class _HookLoader:
    """Delegating loader: executes the real module, then runs the plugin hook."""

    def __init__(self, loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        # Make the module look untouched (inspect/linecache use __loader__).
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        run_hook(self._name, module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class SpectrumImportFinder:
    """Meta-path finder reacting only to the modules in :data:`HOOKS`."""

    _sglang_spectrum_finder = True

    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in HOOKS or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or getattr(finder, "_sglang_spectrum_finder", False):
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _HookLoader(spec.loader, fullname)
                    return spec
            return None
        finally:
            self._busy.discard(fullname)

    def invalidate_caches(self) -> None:  # importlib API
        pass


def installed_finder() -> SpectrumImportFinder | None:
    for finder in sys.meta_path:
        if getattr(finder, "_sglang_spectrum_finder", False):
            return finder  # type: ignore[return-value]
    return None


def install() -> bool:
    """Put the finder first on ``sys.meta_path`` (idempotent). Called from the ``.pth``."""
    if is_disabled():
        return False
    if installed_finder() is None:
        sys.meta_path.insert(0, SpectrumImportFinder())
    return True


def activate() -> bool:
    """Install the finder and run the hooks of SGLang modules that are already imported."""
    if not install():
        return False
    ok = True
    for name in HOOKS:  # dict order: server_args before the disaggregation modules
        module = sys.modules.get(name)
        if module is not None:
            ok = run_hook(name, module) and ok
    return ok
