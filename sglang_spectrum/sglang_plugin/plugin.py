"""SGLang general plugin (entry point group ``sglang.srt.plugins``, name ``spectrumkv``).

SGLang 0.5.14+ runs :func:`register` through ``sglang.srt.plugins.load_plugins()``
in every process that matters: the launcher (``launch_server.py``, ``sglang
serve``), ``sglang.Engine``, and each scheduler process at start
(``run_scheduler_process``). It registers, with SGLang's ``HookRegistry``:

* the transfer backend ``spectrum``: a choice of ``--disaggregation-transfer-backend``
  (``add_disagg_transfer_backend_choices``), a ``TransferBackend`` member, and
  an AROUND hook on ``disaggregation.utils.get_kv_class`` answering our classes
  for it (every other backend goes to SGLang's function);
* the ``--spectrum-*`` options: AFTER hooks on ``ServerArgs.add_cli_args`` (the
  option group) and ``ServerArgs.from_cli_args`` (validation; the values reach
  the scheduler processes through ``SGLANG_SPECTRUM_OPTIONS``, see :mod:`.options`);
* the KV-pool hand-over: an AFTER hook on ``Scheduler.__init__`` gives the KV
  pool to a ``spectrum`` KV manager (then the prefill runs the INT4 probe and
  publishes its identity);
* with ``--spectrum-layer-group`` > 0 only: hooks around ``Scheduler.run_batch``
  and after ``RadixAttention.forward`` (:mod:`.layer_pipeline`).

``SGLANG_SPECTRUM_DISABLE=1`` (or ``SGLANG_PLUGINS`` without ``spectrumkv``)
leaves SGLang untouched. On an SGLang version the backend does not support,
only the choice is added, and choosing it stops the launcher with one line
naming the supported versions.
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from typing import Any

from . import BACKEND_NAME, DISABLE_ENV

logger = logging.getLogger(__name__)

ENUM_NAME = "SPECTRUM"
_registered = False


def is_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def add_enum_member(enum_cls: type[Enum], name: str, value: Any) -> Enum:
    """Add a member to an existing (plain) Enum class; returns it (idempotent)."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls  # type: ignore[attr-defined]
    member._sort_order_ = len(enum_cls._member_names_)  # type: ignore[attr-defined]
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)  # type: ignore[attr-defined]
    type.__setattr__(enum_cls, name, member)
    return member


def _add_choice() -> None:
    from sglang.srt import server_args

    if BACKEND_NAME not in server_args.DISAGG_TRANSFER_BACKEND_CHOICES:
        server_args.add_disagg_transfer_backend_choices([BACKEND_NAME])


# ------------------------------------------------------------------ hooks


def _after_add_cli_args(result: Any, parser: Any) -> None:
    from .options import add_cli_args

    add_cli_args(parser)


def _before_from_cli_args(*args: Any, **kwargs: Any) -> None:
    ns = args[-1] if args else kwargs.get("args")
    if getattr(ns, "disaggregation_transfer_backend", None) == BACKEND_NAME:
        from .compat import apply_cpu_defaults

        apply_cpu_defaults(ns)
    return None


def _after_from_cli_args(server_args: Any, cls: Any, ns: Any) -> None:
    from .compat import UnsupportedSGLangError, check_sglang_version
    from .options import _exit_error, apply_cli_namespace

    ours = getattr(ns, "disaggregation_transfer_backend", None) == BACKEND_NAME
    if ours:
        try:
            check_sglang_version()
        except UnsupportedSGLangError as e:
            _exit_error(str(e))
    opts = apply_cli_namespace(ns)  # (exits on bad options; None: not our backend)
    if ours and opts is not None:
        from .compat import unsupported_deployment

        problem = unsupported_deployment(server_args, opts)
        if problem and getattr(server_args, "disaggregation_mode", "null") != "null":
            _exit_error(problem)


def _around_get_kv_class(original: Any, transfer_backend: Any, class_type: Any) -> Any:
    if getattr(transfer_backend, "value", transfer_backend) != BACKEND_NAME:
        return original(transfer_backend, class_type)
    from .endpoints import SpectrumKVBootstrapServer, SpectrumKVReceiver, SpectrumKVSender
    from .manager import SpectrumKVManager

    name = getattr(class_type, "value", class_type)
    if name == "kvargs":
        from sglang.srt.disaggregation.base.conn import KVArgs

        return KVArgs
    return {
        "manager": SpectrumKVManager,
        "sender": SpectrumKVSender,
        "receiver": SpectrumKVReceiver,
        "bootstrap_server": SpectrumKVBootstrapServer,
    }.get(name)


def _before_alloc_memory_pool(runner: Any, *args: Any, **kwargs: Any) -> None:
    """Reserve the spectrum arena before SGLang sizes its KV pool, so the pool is
    sized around it (the arena is inside SGLang's memory plan, not taken from the
    activation / CUDA-graph headroom)."""
    from . import compat

    server_args = getattr(runner, "server_args", None)
    if (
        compat.is_draft_runner(runner)
        or compat.server_arg(server_args, "disaggregation_transfer_backend") != BACKEND_NAME
        or compat.server_arg(server_args, "disaggregation_mode", "null") == "null"
    ):
        return None
    kv_memory = compat.kv_memory_budget(runner)
    if kv_memory is None:  # CPU: pools are capped by --max-total-tokens, nothing to plan
        return None
    import torch

    from .options import current_options
    from .transport import joint_arena_bytes, reserve_arena_memory

    opts = current_options()
    is_decode = compat.server_arg(server_args, "disaggregation_mode") == "decode"
    if is_decode and opts.host_staging:  # its receive arena is pinned host memory
        return None
    if opts.arena_mb:
        nbytes = int(opts.arena_mb * (1 << 20))
    else:
        largest = _longest_region(runner, kv_memory, opts) if is_decode else 0
        nbytes = joint_arena_bytes(kv_memory, opts.budget, largest)
    reserve_arena_memory(nbytes, torch.device("cuda", int(runner.gpu_id)))
    logger.info(
        "SpectrumKV: reserved %.1f MiB for the transfer arena before the KV pool is sized"
        " (%.1f GiB left for it)",
        nbytes / (1 << 20),
        kv_memory / (1 << 30),
    )
    return None


def _longest_region(runner: Any, kv_memory: int, opts: Any) -> int:
    """Receive-region bytes of the longest request a decode about to size its KV pool
    will admit (0 if the runner's layout is unknown): its context length, at most what
    ``kv_memory`` holds, at the decode's bound codec, with room for the most parts (the
    prefill's chunk size is not known yet)."""
    import torch

    from sglang_spectrum.codec import SOURCE_DTYPES

    from . import compat
    from .transport import MAX_PARTS, longest_receive_region

    plan = compat.planned_kv_layout(runner)
    if plan is None or plan[0]["dtype"] not in SOURCE_DTYPES:
        # unknown layout (or a dtype attach refuses): the attach-time check still
        # refuses an arena that cannot hold the longest request
        return 0
    layout, tokens = plan
    cell = 2 * layout["layers"] * layout["kv_heads"] * layout["head_dim"]
    cell *= getattr(torch, layout["dtype"]).itemsize
    tokens = max(min(tokens, kv_memory // max(cell, 1)), 1)
    chunk = -(-tokens // (MAX_PARTS - 2))  # parts = MAX_PARTS
    return longest_receive_region(layout, tokens, opts.bound_codec(), chunk)


def _after_scheduler_init(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    from .compat import kv_manager
    from .manager import SpectrumKVManager

    mgr = kv_manager(scheduler)
    if isinstance(mgr, SpectrumKVManager):
        mgr.attach(scheduler)


def _register_layer_hooks(registry: Any, hook_type: Any) -> None:
    """``--spectrum-layer-group`` > 0 (the options a scheduler process inherits): the
    hooks of :mod:`.layer_pipeline` around each batch and after each attention layer.
    Not registered otherwise: no wrapper on the forward's hot path."""
    from .options import current_options

    if not current_options().layer_group:
        return
    from .layer_pipeline import HOOKS

    for target, hook, kind in HOOKS:
        registry.register(target, hook, getattr(hook_type, kind))


# ------------------------------------------------------------------ entry point


def register() -> None:
    """Entry point run by SGLang's ``load_plugins()`` (idempotent, never raises)."""
    global _registered
    if _registered or is_disabled():
        return
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from .compat import UnsupportedSGLangError, check_sglang_version

        _add_choice()
        HookRegistry.register(
            "sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER
        )
        HookRegistry.register(
            "sglang.srt.server_args.ServerArgs.from_cli_args",
            _after_from_cli_args,
            HookType.AFTER,
        )
        HookRegistry.register(
            "sglang.srt.server_args.ServerArgs.from_cli_args",
            _before_from_cli_args,
            HookType.BEFORE,
        )
        try:
            check_sglang_version()
        except UnsupportedSGLangError as e:
            logger.warning("%s", e)
            _registered = True
            return
        from sglang.srt.disaggregation import utils

        add_enum_member(utils.TransferBackend, ENUM_NAME, BACKEND_NAME)
        HookRegistry.register(
            "sglang.srt.disaggregation.utils.get_kv_class", _around_get_kv_class, HookType.AROUND
        )
        HookRegistry.register(
            "sglang.srt.managers.scheduler.Scheduler.__init__",
            _after_scheduler_init,
            HookType.AFTER,
        )
        HookRegistry.register(
            "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool",
            _before_alloc_memory_pool,
            HookType.BEFORE,
        )
        _register_layer_hooks(HookRegistry, HookType)
        _registered = True
    except Exception as e:  # a broken plugin must never break SGLang
        logger.warning(
            "sglang_spectrum: plugin disabled (%s: %s); SGLang runs without the '%s' backend",
            type(e).__name__,
            e,
            BACKEND_NAME,
        )


def is_registered() -> bool:
    """True if SGLang's enum and dispatch know the spectrum backend in this process."""
    import sys

    utils = sys.modules.get("sglang.srt.disaggregation.utils")
    return (
        utils is not None
        and BACKEND_NAME in utils.TransferBackend._value2member_map_
        and getattr(utils.get_kv_class, "__wrapped__", None) is not None
    )
