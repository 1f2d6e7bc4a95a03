"""Evaluation methods by name -> :class:`SpectrumConfig`.

A method name is a base name plus optional ``+option`` suffixes:

- bases: ``full``, ``int8``, ``int4``, ``pdtrim``, ``snapkv``, ``spectrum-3tier``,
  ``spectrum-2tier``, ``spectrum-auto`` (3 or 2 tiers, as the INT4 probe decided),
  and the FP8 KV-cache baselines ``fp8_e4m3`` / ``fp8_e5m2``;
- options: ``+had`` (Hadamard rotation before quantisation), ``+gNN`` (group
  size NN along head_dim), ``+kc`` (INT8/INT4 keys scaled per channel over blocks
  of 64 tokens, as KIVI does), ``+kn`` (key-norm scores instead of
  observation-window attention, i.e. what the SGLang backend uses, which sees no
  queries), ``+knG`` (key-norm scores of the first ``G`` layers only: the tier
  map a layer-pipelined prefill can decide once layers ``0..G-1`` are computed).

Every codec method goes through the same codec and byte accounting. The FP8
methods take no options: they are not a codec but the cast SGLang's FP8 KV
cache applies to K and V (``--kv-cache-dtype fp8_e4m3|fp8_e5m2``), 1 byte per
element, so exactly 0.5 of the 16-bit KV with no header; they run at b=0.5 only
(:func:`sglang_spectrum.eval.runner.pool_cast_kv`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import SpectrumConfig, SpectrumConfigError

BASE_METHODS = (
    "full",
    "int8",
    "int4",
    "pdtrim",
    "snapkv",
    "spectrum-3tier",
    "spectrum-2tier",
    "spectrum-auto",
)
# FP8 KV-cache baselines: method name -> torch dtype name of SGLang's pool.
POOL_CAST_METHODS = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
POOL_CAST_BUDGET = 0.5  # 1 byte per element against 2: their only byte ratio
DEFAULT_METHODS = BASE_METHODS
DEFAULT_BUDGETS = (0.25, 0.3, 0.4, 0.5, 0.75)
ALLOCATOR_METHODS = ("spectrum-3tier", "spectrum-2tier", "spectrum-auto")


@dataclass(frozen=True)
class Method:
    """A parsed method name."""

    name: str
    base: str
    rotation: str = "none"
    group_size: int | None = None
    key_scales: str = "token"
    key_norm: bool = False
    key_norm_layers: int | None = None  # +knG: score from layers 0..G-1 only
    fp8_pool: bool = False  # +fp8: packed from an FP8 e4m3 KV pool (SGLang --kv-cache-dtype)

    @property
    def uses_allocator(self) -> bool:
        return self.base in ALLOCATOR_METHODS

    @property
    def is_pool_cast(self) -> bool:
        """An FP8 KV-cache baseline (a cast, not a codec configuration)."""
        return self.base in POOL_CAST_METHODS

    @property
    def pool_dtype(self):
        """The torch float8 dtype of an FP8 baseline's pool."""
        import torch

        return getattr(torch, POOL_CAST_METHODS[self.base])

    def config(self, budget: float, allocator: str = "paper", auto_tiers: AutoTiers = "2"):
        """The codec configuration of this method at ``budget``.

        ``auto_tiers`` ("3"/"2", or a callable of this method) resolves
        ``spectrum-auto``: the INT4 probe's decision for this method's codec.
        """
        if self.is_pool_cast:
            raise SpectrumConfigError(
                f"{self.name} is a KV-cache cast, not a codec configuration"
                " (runner.pool_cast_kv applies it)"
            )
        if callable(auto_tiers):
            auto_tiers = auto_tiers(self) if self.base == "spectrum-auto" else "2"
        common = {
            "rotation": self.rotation,
            "group_size": self.group_size,
            "key_scales": self.key_scales,
        }
        if self.base == "full":
            return SpectrumConfig(budget=1.0, method="full", **common)
        if self.base in ("int8", "int4", "pdtrim", "snapkv"):
            return SpectrumConfig(budget=budget, method=self.base, **common)
        tiers = {"spectrum-3tier": "3", "spectrum-2tier": "2"}.get(self.base, auto_tiers)
        return SpectrumConfig(budget=budget, tiers=tiers, allocator=allocator, **common)


# How spectrum-auto resolves: a fixed "3"/"2", or the probe's decision per method's codec.
AutoTiers = str | Callable[[Method], str]


def parse_method(name: str) -> Method:
    """Parse ``base[+had][+gNN][+kc][+kn|+knG][+fp8]`` or ``fp8_e4m3``/``fp8_e5m2`` (no
    options); ``+fp8``: the KV is first stored in an FP8 e4m3 pool and packed from it;
    raises SpectrumConfigError on unknown parts."""
    base, *opts = name.split("+")
    if base in POOL_CAST_METHODS:
        if opts:
            raise SpectrumConfigError(
                f"{base} takes no options (got {name!r}): it is SGLang's FP8 KV cache as is"
            )
        return Method(name=name, base=base)
    if base not in BASE_METHODS:
        choices = ", ".join(BASE_METHODS + tuple(POOL_CAST_METHODS))
        raise SpectrumConfigError(f"unknown method {base!r}; choose from {choices}")
    kwargs: dict = {}
    for opt in opts:
        if opt == "had":
            kwargs["rotation"] = "hadamard"
        elif opt == "kn":
            kwargs["key_norm"] = True
        elif opt.startswith("kn") and opt[2:].isdigit() and int(opt[2:]) > 0:
            kwargs["key_norm"] = True
            kwargs["key_norm_layers"] = int(opt[2:])
        elif opt == "kc":
            kwargs["key_scales"] = "channel"
        elif opt == "fp8":
            kwargs["fp8_pool"] = True
        elif opt.startswith("g") and opt[1:].isdigit():
            kwargs["group_size"] = int(opt[1:])
        else:
            raise SpectrumConfigError(
                f"unknown method option {opt!r} in {name!r} (had, gNN, kc, kn, knG with G >= 1,"
                " fp8)"
            )
    return Method(name=name, base=base, **kwargs)


def expand_runs(
    methods: list[str], budgets: list[float], allocators: list[str]
) -> list[tuple[Method, str, float]]:
    """All (method, allocator, budget) combinations to evaluate; ``full`` runs once at
    1.0, the FP8 baselines once at 0.5 (their byte ratio, whatever ``budgets`` says)."""
    runs = []
    for name in methods:
        m = parse_method(name)
        if m.base == "full":
            runs.append((m, "-", 1.0))
            continue
        if m.is_pool_cast:
            runs.append((m, "-", POOL_CAST_BUDGET))
            continue
        for alloc in allocators if m.uses_allocator else ["-"]:
            for b in budgets:
                runs.append((m, alloc, float(b)))
    return runs


def resolve_runs(
    runs: list[tuple[Method, str, float]] | None,
    methods: list[str] | None = None,
    budgets: list[float] | None = None,
    allocators: list[str] | None = None,
) -> list[tuple[Method, str, float]]:
    """``runs`` (or the expansion of methods x budgets x allocators) with ``full``
    first if missing: every metric is relative to full precision on the same prompts."""
    if runs is None:
        runs = expand_runs(methods or ["full"], budgets or [0.5], allocators or ["paper"])
    if not any(m.base == "full" for m, _, _ in runs):
        runs = expand_runs(["full"], [1.0], ["paper"]) + runs
    return runs


def record_base(
    method: Method, allocator: str, budget: float, context: int, ratios: list[float]
) -> dict:
    """The fields every result record shares (metric, value and stderr are added)."""
    return {
        "method": method.name,
        "allocator": allocator,
        "budget": budget,
        "context": context,
        "n": len(ratios),
        "bytes_ratio": float(sum(ratios) / len(ratios)),
    }
