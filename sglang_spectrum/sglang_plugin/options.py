"""The ``--spectrum-*`` server options: CLI registration, storage on ServerArgs, validation.

Values live as plain attributes of the ``ServerArgs`` instance
(``server_args.spectrum_budget`` ...): instance attributes are pickled with it,
so they reach the spawned scheduler processes. Class-level defaults make the
attributes exist on every ``ServerArgs`` (also one built programmatically).

Option values are validated by argparse actions (``parser.error`` -> usage line,
``error: --spectrum-budget must be in (0, 1], got 1.5``, exit code 2); checks
that need several options or the model run after ``from_cli_args`` and exit
the same way.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

from . import BACKEND_NAME

logger = logging.getLogger(__name__)

TIER_CHOICES = ("auto", "3", "2")
ALLOCATOR_CHOICES = ("paper", "optimal")
ROTATION_CHOICES = ("none", "hadamard")
KEY_SCALE_CHOICES = ("token", "channel")
# attribute on ServerArgs -> default
DEFAULTS: dict[str, Any] = {
    "spectrum_budget": 0.5,
    "spectrum_tiers": "auto",
    "spectrum_allocator": "paper",
    "spectrum_probe_refresh": False,
    "spectrum_arena_mb": 0.0,
    "spectrum_rotation": "none",
    "spectrum_group_size": 0,
    "spectrum_key_scales": "token",
}
_MARK = "_sglang_spectrum_options"


class SpectrumOptionError(ValueError):
    """A ``--spectrum-*`` option is invalid; the message is ready for the CLI."""


@dataclass(frozen=True)
class SpectrumServerOptions:
    """The plugin's view of the ``--spectrum-*`` options of one server."""

    budget: float = DEFAULTS["spectrum_budget"]
    tiers: str = DEFAULTS["spectrum_tiers"]
    allocator: str = DEFAULTS["spectrum_allocator"]
    probe_refresh: bool = DEFAULTS["spectrum_probe_refresh"]
    arena_mb: float = DEFAULTS["spectrum_arena_mb"]
    rotation: str = DEFAULTS["spectrum_rotation"]
    group_size: int | None = None  # quantisation group along head_dim; None = head_dim
    key_scales: str = DEFAULTS["spectrum_key_scales"]

    def __post_init__(self) -> None:
        check_budget(self.budget)
        object.__setattr__(self, "tiers", _choice("tiers", str(self.tiers), TIER_CHOICES))
        _choice("allocator", self.allocator, ALLOCATOR_CHOICES)
        _choice("rotation", self.rotation, ROTATION_CHOICES)
        _choice("key-scales", self.key_scales, KEY_SCALE_CHOICES)
        object.__setattr__(self, "budget", float(self.budget))
        object.__setattr__(self, "probe_refresh", bool(self.probe_refresh))
        arena = float(self.arena_mb or 0.0)
        if math.isnan(arena) or arena < 0:
            raise SpectrumOptionError(f"--spectrum-arena-mb must be >= 0, got {self.arena_mb}")
        object.__setattr__(self, "arena_mb", arena)
        object.__setattr__(self, "group_size", check_group_size(self.group_size))

    def codec_config(self, **kwargs: Any):
        """A :class:`SpectrumConfig` with this server's codec options (and ``kwargs``)."""
        from sglang_spectrum.config import SpectrumConfig

        return SpectrumConfig(
            rotation=self.rotation,
            group_size=self.group_size,
            key_scales=self.key_scales,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _choice(flag: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise SpectrumOptionError(
            f"--spectrum-{flag} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


def check_budget(value: Any) -> float:
    """The budget as float, or :class:`SpectrumOptionError` unless it is in (0, 1]."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise SpectrumOptionError(
            f"--spectrum-budget must be a number in (0, 1], got {value!r}"
        ) from None
    if math.isnan(budget) or not (0.0 < budget <= 1.0):
        raise SpectrumOptionError(f"--spectrum-budget must be in (0, 1], got {value}")
    return budget


def check_group_size(value: Any) -> int | None:
    """The group size as int (None for 0/None = head_dim), or :class:`SpectrumOptionError`."""
    if value is None:
        return None
    try:
        group = int(value)
    except (TypeError, ValueError):
        raise SpectrumOptionError(
            f"--spectrum-group-size must be an even integer >= 2 (0 = head_dim), got {value!r}"
        ) from None
    if group == 0:
        return None
    if group < 2 or group % 2:
        raise SpectrumOptionError(
            f"--spectrum-group-size must be an even integer >= 2 (0 = head_dim), got {value}"
        )
    return group


def options_from_server_args(server_args: Any) -> SpectrumServerOptions:
    """Read (and validate) the options stored on a ``ServerArgs``."""
    return SpectrumServerOptions(
        budget=getattr(server_args, "spectrum_budget", DEFAULTS["spectrum_budget"]),
        tiers=getattr(server_args, "spectrum_tiers", DEFAULTS["spectrum_tiers"]),
        allocator=getattr(server_args, "spectrum_allocator", DEFAULTS["spectrum_allocator"]),
        probe_refresh=getattr(
            server_args, "spectrum_probe_refresh", DEFAULTS["spectrum_probe_refresh"]
        ),
        arena_mb=getattr(server_args, "spectrum_arena_mb", DEFAULTS["spectrum_arena_mb"]),
        rotation=getattr(server_args, "spectrum_rotation", DEFAULTS["spectrum_rotation"]),
        group_size=getattr(server_args, "spectrum_group_size", DEFAULTS["spectrum_group_size"]),
        key_scales=getattr(server_args, "spectrum_key_scales", DEFAULTS["spectrum_key_scales"]),
    )


def no_drop_floor(
    tiers: str, head_dim: int, group_size: int | None = None, key_scales: str = "token"
) -> float:
    """Smallest budget at which long prompts need no dropped tokens.

    Every token at the lowest enabled tier (INT4 for 3 tiers and for ``auto``
    before the probe ran, INT8 for 2 tiers), in the codec's byte accounting
    (smaller groups carry more scales). Short prompts need more (attention
    sinks stay FP16, the header is fixed).
    """
    from sglang_spectrum.codec import config_layout
    from sglang_spectrum.config import SpectrumConfig
    from sglang_spectrum.policy import Tier

    cfg = SpectrumConfig(group_size=group_size, key_scales=key_scales)
    layout = config_layout(cfg, 1, 1, head_dim, "bfloat16", 1)
    lowest = Tier.INT8 if tiers == "2" else Tier.INT4
    row = layout.key_row_nbytes(lowest) + layout.row_nbytes(lowest)
    return row / (2 * layout.row_nbytes(Tier.FP16))


def check_no_drop(opts: SpectrumServerOptions, head_dim: int | None) -> None:
    """Refuse budgets that force dropped tokens (not supported when serving, DESIGN.md §8)."""
    if head_dim is None:
        return
    if opts.group_size is not None and int(head_dim) % opts.group_size:
        raise SpectrumOptionError(
            f"--spectrum-group-size {opts.group_size} does not divide the model's"
            f" head_dim {head_dim}"
        )
    floor = no_drop_floor(opts.tiers, int(head_dim), opts.group_size, opts.key_scales)
    if opts.budget < floor:
        mode = {"2": "2 tiers (FP16+INT8)", "3": "3 tiers (FP16+INT8+INT4)"}.get(
            opts.tiers, "any tier mode (auto: at best FP16+INT8+INT4)"
        )
        raise SpectrumOptionError(
            f"--spectrum-budget {opts.budget:g} is below {floor:.3f}, the least {mode} can send"
            f" for head_dim {head_dim}{_group_desc(opts.group_size)} without dropping tokens;"
            " SGLang's decode path cannot"
            f" drop tokens (no per-request position offset), use a budget >= {floor:.3f}"
        )


def _group_desc(group_size: int | None) -> str:
    return "" if group_size is None else f" and group size {group_size}"


def _model_head_dim(server_args: Any) -> int | None:
    try:
        return int(server_args.get_model_config().head_dim)
    except Exception as e:  # the scheduler checks again with the KV pool's head_dim
        logger.debug("spectrum: model head_dim unknown at argument time: %s", e)
        return None


def validate_server_args(server_args: Any, head_dim: int | None = None) -> SpectrumServerOptions:
    """All checks for a server that uses the spectrum backend (raises SpectrumOptionError)."""
    opts = options_from_server_args(server_args)
    if getattr(server_args, "disaggregation_mode", "null") == "null":
        raise SpectrumOptionError(
            "--disaggregation-transfer-backend spectrum needs --disaggregation-mode prefill|decode"
        )
    check_no_drop(opts, head_dim)
    return opts


# --------------------------------------------------------------------------- argparse


class _CheckedAction(argparse.Action):
    """Store ``check(value)``; a :class:`SpectrumOptionError` becomes argparse's usage error."""

    check = staticmethod(lambda value: value)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, self.check(values))
        except SpectrumOptionError as e:
            parser.error(str(e))


class _BudgetAction(_CheckedAction):
    check = staticmethod(check_budget)


class _GroupSizeAction(_CheckedAction):
    check = staticmethod(lambda v: check_group_size(v) or 0)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Append the SpectrumKV option group (defaults None = not given)."""
    group = parser.add_argument_group(
        "SpectrumKV", f"Used with --disaggregation-transfer-backend {BACKEND_NAME}."
    )
    group.add_argument(
        "--spectrum-budget",
        action=_BudgetAction,
        default=None,
        metavar="B",
        help="KV bytes sent / bytes of the full 16-bit KV, in (0, 1]"
        f" (default {DEFAULTS['spectrum_budget']}).",
    )
    group.add_argument(
        "--spectrum-tiers",
        choices=TIER_CHOICES,
        default=None,
        help="Precision tiers: 3 = FP16+INT8+INT4, 2 = FP16+INT8, auto = decided by the"
        f" INT4-tolerance probe (default {DEFAULTS['spectrum_tiers']}).",
    )
    group.add_argument(
        "--spectrum-allocator",
        choices=ALLOCATOR_CHOICES,
        default=None,
        help="Tier allocator: paper = rank-ordered waterfall, optimal = error-minimising"
        f" knapsack (default {DEFAULTS['spectrum_allocator']}).",
    )
    group.add_argument(
        "--spectrum-rotation",
        choices=ROTATION_CHOICES,
        default=None,
        help="Rotate each K/V head by a normalised Hadamard matrix before INT8/INT4"
        " quantisation (undone on unpack): spreads outlier channels, much lower INT4 error"
        f" (default {DEFAULTS['spectrum_rotation']}).",
    )
    group.add_argument(
        "--spectrum-group-size",
        action=_GroupSizeAction,
        default=None,
        metavar="G",
        help="INT8/INT4 quantisation group along head_dim (even, divides head_dim); smaller"
        " groups cost more scale bytes, counted in the budget. 0 = head_dim (default).",
    )
    group.add_argument(
        "--spectrum-key-scales",
        choices=KEY_SCALE_CHOICES,
        default=None,
        help="token: INT8/INT4 keys get one scale per token and group, like values;"
        " channel: one scale per channel over 64-token blocks (KIVI), for models whose keys"
        " have outlier channels (e.g. Qwen2.5: INT4 perplexity +13.3%% -> +0.6%%, same bytes"
        " at head_dim 64). Torch path: the Triton kernels need token scales"
        f" (default {DEFAULTS['spectrum_key_scales']}).",
    )
    group.add_argument(
        "--spectrum-probe-refresh",
        action="store_true",
        default=None,
        help="Re-run the INT4-tolerance probe instead of using a cached result.",
    )
    group.add_argument(
        "--spectrum-arena-mb",
        type=float,
        default=None,
        metavar="MB",
        help="Size of the Mooncake-registered packed-KV arena (prefill: send buffers,"
        " decode: receive buffers). 0 = auto: a quarter of the KV pool, 64 MiB to 1 GiB."
        " A full decode arena defers new transfers until a region frees.",
    )


def _exit_error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def apply_cli_namespace(server_args: Any, ns: argparse.Namespace) -> None:
    """Copy given ``--spectrum-*`` values onto ``server_args`` and run the startup checks."""
    given = {k: getattr(ns, k) for k in DEFAULTS if getattr(ns, k, None) is not None}
    for key, value in given.items():
        setattr(server_args, key, value)
    if getattr(server_args, "disaggregation_transfer_backend", None) != BACKEND_NAME:
        if given:
            logger.warning(
                "%s ignored: only used with --disaggregation-transfer-backend %s",
                ", ".join("--" + k.replace("_", "-") for k in given),
                BACKEND_NAME,
            )
        return
    try:
        validate_server_args(server_args, _model_head_dim(server_args))
    except SpectrumOptionError as e:
        _exit_error(str(e))
    validate_ib = getattr(server_args, "_validate_ib_devices", None)
    if validate_ib is not None:  # upstream does this for "mooncake" only (server_args.py:3286)
        server_args.disaggregation_ib_device = validate_ib(server_args.disaggregation_ib_device)


# --------------------------------------------------------------------------- hook


def install(server_args_module: Any) -> None:
    """Hook for ``sglang.srt.server_args``: choices, options, ServerArgs defaults (idempotent)."""
    ServerArgs = server_args_module.ServerArgs
    if getattr(ServerArgs, _MARK, False):
        return
    # The backend must exist before it becomes a valid choice: importing the
    # utils module runs (or we run) registry.install; if that fails, "spectrum"
    # stays an invalid choice instead of crashing later in the scheduler.
    import importlib

    utils = importlib.import_module("sglang.srt.disaggregation.utils")
    from . import registry

    registry.install(utils)

    for key, value in DEFAULTS.items():
        if not hasattr(ServerArgs, key):
            setattr(ServerArgs, key, value)

    orig_add = ServerArgs.__dict__["add_cli_args"].__func__
    orig_from = ServerArgs.__dict__["from_cli_args"].__func__

    def add_cli_args_with_spectrum(parser: argparse.ArgumentParser) -> None:
        orig_add(parser)
        add_cli_args(parser)

    def from_cli_args_with_spectrum(cls, args: argparse.Namespace):
        server_args = orig_from(cls, args)
        apply_cli_namespace(server_args, args)
        return server_args

    add_cli_args_with_spectrum.__wrapped__ = orig_add  # type: ignore[attr-defined]
    from_cli_args_with_spectrum.__wrapped__ = orig_from  # type: ignore[attr-defined]
    ServerArgs.add_cli_args = staticmethod(add_cli_args_with_spectrum)
    ServerArgs.from_cli_args = classmethod(from_cli_args_with_spectrum)
    choices = server_args_module.DISAGG_TRANSFER_BACKEND_CHOICES
    if BACKEND_NAME not in choices:
        server_args_module.add_disagg_transfer_backend_choices([BACKEND_NAME])
    setattr(ServerArgs, _MARK, True)
