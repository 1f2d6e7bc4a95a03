"""User-facing configuration and errors of SpectrumKV.

`SpectrumConfig` is the one object every layer reads: scoring (sinks, window),
allocation (budget, tiers, allocator, method) and the codec (group size,
rotation). It validates itself on construction so a bad value fails where the
user typed it, not deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

METHODS = ("spectrum", "full", "int8", "int4", "pdtrim", "snapkv")
ALLOCATORS = ("paper", "optimal")
TIER_MODES = ("3", "2")
ROTATIONS = ("none", "hadamard")
KEY_SCALES = ("token", "channel")


class SpectrumError(Exception):
    """Base class of every error SpectrumKV raises on purpose."""


class SpectrumConfigError(SpectrumError, ValueError):
    """An option is out of range or options contradict each other."""


class SpectrumFormatError(SpectrumError, ValueError):
    """A packed buffer is malformed, truncated, corrupted or of another version."""


@dataclass(frozen=True)
class SpectrumConfig:
    """How one request's KV cache is scored, allocated to tiers and packed.

    Attributes:
        budget: bytes sent / bytes of the full 16-bit KV, in (0, 1]. The packed
            buffer (header included) never exceeds ``budget * full_nbytes``.
        tiers: ``"3"`` = {FP16, INT8, INT4, drop}, ``"2"`` = {FP16, INT8, drop}.
        allocator: ``"paper"`` (rank-ordered waterfall: the most important
            tokens get the highest tier) or ``"optimal"`` (multiple-choice
            knapsack minimising importance-weighted reconstruction error,
            solved by Lagrangian relaxation).
        method: ``"spectrum"`` (tiered) or a baseline in the same byte
            accounting: ``"full"`` (all FP16; needs budget 1.0), ``"int8"`` /
            ``"int4"`` (uniform, least important tokens dropped only if even
            that does not fit), ``"pdtrim"`` (first and last token runs at
            FP16, middle dropped), ``"snapkv"`` (top-k by importance at FP16).
        sinks: the first ``sinks`` tokens are always FP16 (attention sinks).
        window: observation window (last query positions used for scoring)
            and recent window (last tokens ranked just below the sinks).
        group_size: quantisation group along head_dim; None = head_dim.
        rotation: ``"hadamard"`` rotates each head vector by an orthonormal
            Hadamard matrix before INT8/INT4 quantisation (inverted on unpack;
            free in bytes); ``"none"`` quantises the raw vectors.
        key_scales: ``"token"``: keys like values, one (scale, min) per token and
            group; ``"channel"``: INT8/INT4 keys get one (scale, min) per channel
            over blocks of ``key_block`` consecutive rows of a tier segment (as
            KIVI does): keys have outlier channels (large RoPE'd / biased
            dimensions) that per-token scales cannot resolve. Values stay per token.
        key_block: rows per key scale block with ``key_scales="channel"``.
        pdtrim_head_fraction: share of PDTrim's kept tokens taken from the
            start of the prompt (at least ``sinks``); the rest from the end.
        allow_drop: False never drops a token: when the budget cannot hold
            every token at the cheapest allowed tier (a short prompt, whose
            sinks and header weigh more), the budget is raised to that floor.
            Serving uses this, since SGLang's decode path cannot skip positions.
    """

    budget: float = 0.5
    tiers: str = "3"
    allocator: str = "paper"
    sinks: int = 4
    window: int = 32
    group_size: int | None = None
    method: str = "spectrum"
    rotation: str = "none"
    key_scales: str = "token"
    key_block: int = 64
    pdtrim_head_fraction: float = 0.1
    allow_drop: bool = True

    def __post_init__(self) -> None:
        try:
            budget = float(self.budget)
        except (TypeError, ValueError):
            raise SpectrumConfigError(
                f"budget must be a number in (0, 1], got {self.budget!r}"
            ) from None
        if not (0.0 < budget <= 1.0):
            raise SpectrumConfigError(f"budget must be in (0, 1], got {self.budget!r}")
        object.__setattr__(self, "budget", budget)
        tiers = str(self.tiers)
        if tiers not in TIER_MODES:
            raise SpectrumConfigError(
                f"tiers must be one of {TIER_MODES} ('3' = FP16+INT8+INT4, '2' = FP16+INT8),"
                f" got {self.tiers!r}"
            )
        object.__setattr__(self, "tiers", tiers)
        if self.allocator not in ALLOCATORS:
            raise SpectrumConfigError(
                f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}"
            )
        if self.method not in METHODS:
            raise SpectrumConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "full" and budget < 1.0:
            raise SpectrumConfigError("method 'full' sends everything at 16 bit: use budget=1.0")
        if self.rotation not in ROTATIONS:
            raise SpectrumConfigError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if int(self.sinks) < 0 or int(self.window) < 0:
            raise SpectrumConfigError(
                f"sinks and window must be >= 0, got sinks={self.sinks}, window={self.window}"
            )
        if self.group_size is not None and (int(self.group_size) < 2 or int(self.group_size) % 2):
            raise SpectrumConfigError(
                f"group_size must be an even number >= 2 (or None for head_dim),"
                f" got {self.group_size!r}"
            )
        if self.key_scales not in KEY_SCALES:
            raise SpectrumConfigError(
                f"key_scales must be one of {KEY_SCALES}, got {self.key_scales!r}"
            )
        if int(self.key_block) < 2:
            raise SpectrumConfigError(f"key_block must be >= 2, got {self.key_block!r}")
        if not (0.0 <= self.pdtrim_head_fraction <= 1.0):
            raise SpectrumConfigError("pdtrim_head_fraction must be in [0, 1]")

    def with_(self, **changes) -> SpectrumConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def resolved_key_block(self) -> int:
        """Rows per key scale block on the wire; 0 = per-token key scales."""
        return int(self.key_block) if self.key_scales == "channel" else 0

    def resolved_group_size(self, head_dim: int) -> int:
        """The group size used for this head_dim; must divide head_dim."""
        g = head_dim if self.group_size is None else int(self.group_size)
        if head_dim % g:
            raise SpectrumConfigError(f"group_size {g} does not divide head_dim {head_dim}")
        return g
