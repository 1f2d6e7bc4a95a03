"""The ``--spectrum-*`` server options: CLI registration, hand-over to the scheduler, checks.

SGLang's ``ServerArgs`` is a sealed record (0.5.17) or a msgspec-backed one
(0.5.23): a plugin cannot add fields to it. The options are therefore parsed
in the launcher (an AFTER hook on ``ServerArgs.add_cli_args`` adds the
``--spectrum-*`` group, one on ``ServerArgs.from_cli_args`` validates them) and
handed to every process the launcher spawns through one environment variable,
``SGLANG_SPECTRUM_OPTIONS`` (JSON): scheduler processes inherit it. A program
that builds ``ServerArgs`` itself (``sglang.Engine``) sets that variable, or
gets the defaults.

Option values are validated by argparse actions (``parser.error`` -> usage line,
``error: --spectrum-budget must be in (0, 1], got 1.5``, exit code 2); checks
that need several options run in the ``from_cli_args`` hook and exit the same
way; checks that need the model (head_dim) run when the KV manager starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any

from . import BACKEND_NAME

logger = logging.getLogger(__name__)

TIER_CHOICES = ("auto", "3", "2")
ALLOCATOR_CHOICES = ("paper", "optimal")
ROTATION_CHOICES = ("none", "hadamard")
KEY_SCALE_CHOICES = ("token", "channel")
STREAM_CHOICES = ("chunks", "off")
STAGING_CHOICES = ("auto", "device", "host")
DIRECT_CHOICES = ("auto", "off")
UNPACK_CHOICES = ("arrival", "sent")
# attribute on ServerArgs -> default
DEFAULTS: dict[str, Any] = {
    "spectrum_budget": 0.5,
    "spectrum_tiers": "auto",
    "spectrum_allocator": "paper",
    "spectrum_probe_refresh": False,
    "spectrum_arena_mb": 0.0,
    "spectrum_rotation": "none",
    "spectrum_group_size": 0,
    "spectrum_key_scales": "channel",
    "spectrum_stream": "chunks",
    "spectrum_min_budget": 0.3,
    "spectrum_ttft_slo_ms": 0.0,
    "spectrum_staging": "auto",
    "spectrum_direct": "auto",
    "spectrum_layer_group": 0,
    "spectrum_unpack": "arrival",
}
OPTIONS_ENV = "SGLANG_SPECTRUM_OPTIONS"


class SpectrumOptionError(ValueError):
    """A ``--spectrum-*`` option is invalid; the message is ready for the CLI."""


@dataclass(frozen=True)
class SpectrumServerOptions:
    """The plugin's view of the ``--spectrum-*`` options of one server."""

    budget: float = DEFAULTS["spectrum_budget"]  # "auto" -> budget_mode auto, budget 1.0
    tiers: str = DEFAULTS["spectrum_tiers"]
    allocator: str = DEFAULTS["spectrum_allocator"]
    probe_refresh: bool = DEFAULTS["spectrum_probe_refresh"]
    arena_mb: float = DEFAULTS["spectrum_arena_mb"]
    rotation: str = DEFAULTS["spectrum_rotation"]
    group_size: int | None = None  # quantisation group along head_dim; None = head_dim
    key_scales: str = DEFAULTS["spectrum_key_scales"]
    stream: str = DEFAULTS["spectrum_stream"]
    min_budget: float = DEFAULTS["spectrum_min_budget"]  # auto: the smallest budget chosen
    ttft_slo_ms: float = DEFAULTS["spectrum_ttft_slo_ms"]  # auto: 0 = no SLO
    staging: str = DEFAULTS["spectrum_staging"]  # where the wire bytes sit for Mooncake
    direct: str = DEFAULTS["spectrum_direct"]  # lossless parts page to page (direct.py)
    layer_group: int = DEFAULTS["spectrum_layer_group"]  # layers a pipelined part; 0 = off
    unpack: str = DEFAULTS["spectrum_unpack"]  # decode: unpack each part as it lands, or at Sent
    budget_mode: str = "fixed"  # "auto": chosen per part from the link (adaptive.py)

    def __post_init__(self) -> None:
        if self.budget == "auto" or self.budget_mode == "auto":
            object.__setattr__(self, "budget_mode", "auto")
            object.__setattr__(self, "budget", 1.0)  # the most a part may take
        _choice("budget", self.budget_mode, ("fixed", "auto"))
        check_budget(self.budget)
        object.__setattr__(self, "min_budget", check_budget(self.min_budget, "min-budget"))
        slo = float(self.ttft_slo_ms or 0.0)
        if math.isnan(slo) or slo < 0:
            raise SpectrumOptionError(
                f"--spectrum-ttft-slo-ms must be >= 0, got {self.ttft_slo_ms}"
            )
        object.__setattr__(self, "ttft_slo_ms", slo)
        object.__setattr__(self, "tiers", _choice("tiers", str(self.tiers), TIER_CHOICES))
        _choice("allocator", self.allocator, ALLOCATOR_CHOICES)
        _choice("rotation", self.rotation, ROTATION_CHOICES)
        _choice("key-scales", self.key_scales, KEY_SCALE_CHOICES)
        _choice("stream", self.stream, STREAM_CHOICES)
        _choice("staging", self.staging, STAGING_CHOICES)
        _choice("direct", self.direct, DIRECT_CHOICES)
        _choice("unpack", self.unpack, UNPACK_CHOICES)
        object.__setattr__(self, "budget", float(self.budget))
        object.__setattr__(self, "probe_refresh", bool(self.probe_refresh))
        arena = float(self.arena_mb or 0.0)
        if math.isnan(arena) or arena < 0:
            raise SpectrumOptionError(f"--spectrum-arena-mb must be >= 0, got {self.arena_mb}")
        object.__setattr__(self, "arena_mb", arena)
        object.__setattr__(self, "group_size", check_group_size(self.group_size))
        object.__setattr__(self, "layer_group", check_layer_group(self.layer_group))

    def codec_config(self, **kwargs: Any):
        """A :class:`SpectrumConfig` with this server's codec options (and ``kwargs``)."""
        from sglang_spectrum.config import SpectrumConfig

        return SpectrumConfig(
            rotation=self.rotation,
            group_size=self.group_size,
            key_scales=self.key_scales,
            **kwargs,
        )

    @property
    def adaptive(self) -> bool:
        return self.budget_mode == "auto"

    @property
    def host_staging(self) -> bool:
        """Wire bytes sit in pinned host memory in this process (``--spectrum-staging``
        resolved against its Mooncake transport: :func:`resolved_staging`)."""
        return resolved_staging(self.staging) == "host"

    def layer_groups(self, num_layers: int) -> int:
        """Parts a prefill with these options sends each chunk in (1: no layer groups)."""
        return -(-int(num_layers) // self.layer_group) if self.layer_group else 1

    @property
    def lowest_budget(self) -> float:
        """The smallest budget this server sends at (the fixed one, or auto's minimum)."""
        return self.min_budget if self.adaptive else self.budget

    def bound_codec(self, tiers: str | None = None):
        """The codec config that bounds what a prefill with these options sends, for
        region sizes: its budget (1.0 under auto), no drops, at ``tiers`` (the prefill's
        resolved tier mode where known), else at ``--spectrum-tiers`` when fixed, else at
        2 tiers (the larger no-drop floor bounds either mode the probe may choose)."""
        mode = next((t for t in (tiers, self.tiers) if t in ("2", "3")), "2")
        return self.codec_config(budget=self.budget, tiers=mode, allow_drop=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _choice(flag: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise SpectrumOptionError(
            f"--spectrum-{flag} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


def check_budget(value: Any, flag: str = "budget") -> float:
    """The budget as float, or :class:`SpectrumOptionError` unless it is in (0, 1]."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        extra = " or auto" if flag == "budget" else ""
        raise SpectrumOptionError(
            f"--spectrum-{flag} must be a number in (0, 1]{extra}, got {value!r}"
        ) from None
    if math.isnan(budget) or not (0.0 < budget <= 1.0):
        raise SpectrumOptionError(f"--spectrum-{flag} must be in (0, 1], got {value}")
    return budget


def check_budget_arg(value: Any) -> float | str:
    """``--spectrum-budget``: a number in (0, 1] or ``auto``."""
    return "auto" if str(value).strip().lower() == "auto" else check_budget(value)


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


def check_layer_group(value: Any) -> int:
    """``--spectrum-layer-group`` as int (0 = off), or :class:`SpectrumOptionError`."""
    try:
        group = int(value)
    except (TypeError, ValueError):
        group = -1
    if group < 0 or str(value).strip().lstrip("+") != str(group):
        raise SpectrumOptionError(
            f"--spectrum-layer-group must be an integer >= 0 (0 = off), got {value!r}"
        )
    return group


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def mooncake_nvlink() -> bool:
    """Mooncake's intra-node NVLink transport is configured for this process."""
    pool = os.environ.get("SGLANG_MOONCAKE_CUSTOM_MEM_POOL", "").upper()
    return pool == "INTRA_NODE_NVLINK" or _env_true("MC_INTRANODE_NVLINK")


def mooncake_tcp() -> bool:
    """Mooncake's TCP transport is selected for this process: ``MC_FORCE_TCP`` (read by
    Mooncake itself) or ``MOONCAKE_PROTOCOL=tcp`` (the protocol SGLang's engine wrapper
    passes to ``TransferEngine.initialize``)."""
    return _env_true("MC_FORCE_TCP") or os.environ.get("MOONCAKE_PROTOCOL", "").lower() == "tcp"


def resolved_staging(staging: str) -> str:
    """``device`` or ``host``: ``auto`` is ``host`` under Mooncake's TCP transport
    (:func:`mooncake_tcp`; it stages GPU memory through host memory 64 KiB at a time with
    blocking copies, which one async copy per part replaces: 16k tokens went from 6.9 to
    27.8 Gb/s on the H200) and ``device`` otherwise (RDMA reads GPU memory directly,
    NVLink moves GPU memory only)."""
    if staging != "auto":
        return staging
    return "host" if mooncake_tcp() and not mooncake_nvlink() else "device"


def staging_problem(staging: str) -> str:
    """'' if ``--spectrum-staging`` fits the Mooncake link of this process, else why not:
    host staging needs a transport that reads host memory (TCP, RDMA); Mooncake's
    intra-node NVLink transport moves GPU memory only."""
    if staging == "host" and mooncake_nvlink():
        return (
            "--spectrum-staging host cannot be used with Mooncake's NVLink transport"
            " (SGLANG_MOONCAKE_CUSTOM_MEM_POOL=INTRA_NODE_NVLINK / MC_INTRANODE_NVLINK): it"
            " moves GPU memory only; use --spectrum-staging device"
        )
    return ""


def options_from_dict(values: dict[str, Any]) -> SpectrumServerOptions:
    """Options from a dict of :class:`SpectrumServerOptions` fields (unknown keys refused)."""
    known = {f.name for f in fields(SpectrumServerOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SpectrumOptionError(f"unknown SpectrumKV option(s): {', '.join(unknown)}")
    return SpectrumServerOptions(**values)


def publish_options(opts: SpectrumServerOptions) -> None:
    """Hand the options to the processes this one spawns (scheduler processes)."""
    os.environ[OPTIONS_ENV] = json.dumps(opts.to_dict(), sort_keys=True)


def current_options() -> SpectrumServerOptions:
    """The options of this server process (defaults when none were published).

    Raises :class:`SpectrumOptionError` for a malformed ``SGLANG_SPECTRUM_OPTIONS``.
    """
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return SpectrumServerOptions()
    try:
        values = json.loads(raw)
    except ValueError as e:
        raise SpectrumOptionError(f"{OPTIONS_ENV} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise SpectrumOptionError(f"{OPTIONS_ENV} must be a JSON object, got {raw!r}")
    return options_from_dict(values)


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
    """Refuse budgets that force dropped tokens (SGLang's decode attends over every
    position it allocated, so serving never drops: README, ``--spectrum-budget``)."""
    if head_dim is None:
        return
    if opts.group_size is not None and int(head_dim) % opts.group_size:
        raise SpectrumOptionError(
            f"--spectrum-group-size {opts.group_size} does not divide the model's"
            f" head_dim {head_dim}"
        )
    floor = no_drop_floor(opts.tiers, int(head_dim), opts.group_size, opts.key_scales)
    if opts.lowest_budget < floor:
        mode = {"2": "2 tiers (FP16+INT8)", "3": "3 tiers (FP16+INT8+INT4)"}.get(
            opts.tiers, "any tier mode (auto: at best FP16+INT8+INT4)"
        )
        flag = "min-budget" if opts.adaptive else "budget"
        raise SpectrumOptionError(
            f"--spectrum-{flag} {opts.lowest_budget:g} is below {floor:.3f}, the least {mode}"
            " can send"
            f" for head_dim {head_dim}{_group_desc(opts.group_size)} without dropping tokens;"
            " SGLang's decode path cannot"
            f" drop tokens (no per-request position offset), use a budget >= {floor:.3f}"
        )


def _group_desc(group_size: int | None) -> str:
    return "" if group_size is None else f" and group size {group_size}"


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
    check = staticmethod(check_budget_arg)


class _MinBudgetAction(_CheckedAction):
    check = staticmethod(lambda v: check_budget(v, "min-budget"))


class _GroupSizeAction(_CheckedAction):
    check = staticmethod(lambda v: check_group_size(v) or 0)


class _LayerGroupAction(_CheckedAction):
    check = staticmethod(check_layer_group)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Append the SpectrumKV option group (defaults None = not given)."""
    group = parser.add_argument_group(
        "SpectrumKV", f"Used with --disaggregation-transfer-backend {BACKEND_NAME}."
    )
    group.add_argument(
        "--spectrum-budget",
        action=_BudgetAction,
        default=None,
        metavar="B|auto",
        help="KV bytes sent / bytes of the full 16-bit KV, in (0, 1]"
        f" (default {DEFAULTS['spectrum_budget']}); auto: chosen per prefill chunk from the"
        " measured link rate, the codec cost and the prefill compute still to come, in"
        " [--spectrum-min-budget, 1.0] (lossless when the link is fast enough).",
    )
    group.add_argument(
        "--spectrum-min-budget",
        action=_MinBudgetAction,
        default=None,
        metavar="B",
        help="With --spectrum-budget auto: the smallest budget chosen"
        f" (default {DEFAULTS['spectrum_min_budget']}).",
    )
    group.add_argument(
        "--spectrum-ttft-slo-ms",
        type=float,
        default=None,
        metavar="MS",
        help="With --spectrum-budget auto: the largest budget whose transfer still meets"
        " this time-to-first-token is chosen (default 0 = none: quality never costs more"
        " than 5%% of the TTFT).",
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
        f" at head_dim 64) (default {DEFAULTS['spectrum_key_scales']}).",
    )
    group.add_argument(
        "--spectrum-stream",
        choices=STREAM_CHOICES,
        default=None,
        help="chunks: with chunked prefill, pack and send each chunk's KV (its own share of"
        " the budget) while the next chunk is computed, like the stock backends' per-chunk"
        " sends; off: one allocation over the whole prompt, sent after the last chunk"
        f" (default {DEFAULTS['spectrum_stream']}).",
    )
    group.add_argument(
        "--spectrum-staging",
        choices=STAGING_CHOICES,
        default=None,
        help="device: Mooncake reads and writes the packed KV in GPU memory (its TCP"
        " transport copies GPU memory 64 KiB at a time with blocking cudaMemcpy calls);"
        " host: the prefill copies each packed part into pinned host memory in one"
        " asynchronous copy and sends from there, and the decode receives into pinned"
        " host memory (its arena leaves the GPU to the KV pool) and unpacks from it. For"
        " TCP links; refused with Mooncake's NVLink transport. auto: host under Mooncake's"
        " TCP transport (MC_FORCE_TCP or MOONCAKE_PROTOCOL=tcp), device otherwise (default"
        f" {DEFAULTS['spectrum_staging']}).",
    )
    group.add_argument(
        "--spectrum-direct",
        choices=DIRECT_CHOICES,
        default=None,
        help="auto: a part sent lossless (budget 1.0, fixed or chosen by auto) goes from the"
        " prefill's KV pool pages straight into the decode's, as the stock backend writes"
        " them (no pack, no unpack, no checksum), when both pools hold the same bytes per"
        " token and the wire bytes are not staged on the host; off: every part is packed"
        f" and checksummed (default {DEFAULTS['spectrum_direct']}).",
    )
    group.add_argument(
        "--spectrum-layer-group",
        action=_LayerGroupAction,
        default=None,
        metavar="N",
        help="Prefill: pack and send each chunk's KV in groups of N layers while the later"
        " layers of the chunk are still computed (the tier map of a chunk comes from its"
        " first group's key norms); 0 = off, a chunk goes after its forward"
        f" (default {DEFAULTS['spectrum_layer_group']}). Needs eager prefill forwards"
        " (no prefill CUDA graph) and no speculative decoding.",
    )
    group.add_argument(
        "--spectrum-unpack",
        choices=UNPACK_CHOICES,
        default=None,
        help="Decode: arrival: unpack each part of a request sent in parts (chunks, layer"
        " groups) into the KV pool as soon as the prefill reports it written, while the"
        " later parts are still computed and sent, so only the last part is unpacked after"
        " the request's last write; sent: unpack every part once the whole request is"
        f" written (default {DEFAULTS['spectrum_unpack']}).",
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
        " decode: receive buffers). 0 = auto: on a GPU reserved before SGLang sizes its KV"
        " pool, so that arena = pool x budget / 4 (prefill: at least 4 chunks' send"
        " buffers), 64 MiB to 8 GiB; a decode's holds at least the longest request it"
        " admits, or the decode refuses to start. A full decode arena defers new transfers"
        " until a region frees; an explicit size smaller than the longest request fails"
        " those requests with a clear error.",
    )


def _exit_error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def model_head_dim(model_path: str | None) -> int | None:
    """head_dim from a local model folder's config.json (None when unknown: the KV
    manager checks again with the KV pool's head_dim)."""
    try:
        with open(os.path.join(str(model_path), "config.json")) as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return int(head_dim)
    except Exception:
        return None


def options_from_namespace(ns: argparse.Namespace) -> SpectrumServerOptions:
    """The options given on the command line (defaults for the others)."""
    given = {k: getattr(ns, k) for k in DEFAULTS if getattr(ns, k, None) is not None}
    return options_from_dict({k.removeprefix("spectrum_"): v for k, v in given.items()})


def apply_cli_namespace(ns: argparse.Namespace) -> SpectrumServerOptions | None:
    """Validate the ``--spectrum-*`` values of a parsed command line and publish them.

    Exits with a one-line error (code 2) on an invalid combination. Returns None
    (and warns about given options) when the server does not use the backend.
    """
    given = [k for k in DEFAULTS if getattr(ns, k, None) is not None]
    if getattr(ns, "disaggregation_transfer_backend", None) != BACKEND_NAME:
        if given:
            logger.warning(
                "%s ignored: only used with --disaggregation-transfer-backend %s",
                ", ".join("--" + k.replace("_", "-") for k in given),
                BACKEND_NAME,
            )
        return None
    if getattr(ns, "disaggregation_mode", "null") in (None, "null"):
        _exit_error(
            f"--disaggregation-transfer-backend {BACKEND_NAME} needs"
            " --disaggregation-mode prefill|decode"
        )
    try:
        opts = options_from_namespace(ns)
        check_no_drop(opts, model_head_dim(getattr(ns, "model_path", None)))
    except SpectrumOptionError as e:
        _exit_error(str(e))
    problem = staging_problem(opts.staging)
    if problem:
        _exit_error(problem)
    publish_options(opts)
    return opts
