"""The deployment-time INT4-tolerance probe.

Three aggressive needle-in-a-haystack trials under the 3-tier policy at a low
budget (default b=0.3, where nearly every token is INT4). Pass -> serve with
FP16+INT8+INT4 (tiers "3"); fail -> FP16+INT8 (tiers "2").

A trial only counts where full precision retrieves the needle (otherwise it
says nothing about INT4): the probe shortens its context until full precision
retrieves, and if it never does, the decision is the safe "2".

The probe is engine-agnostic: anything with ``full_answer(ids)`` and
``degraded_answer(ids, config)`` (greedy answers as text) can run it; the
Hugging Face engine lives in :mod:`.runner`, the SGLang one in the plugin.
The decision is cached on disk, keyed by the model's weights identity, the
probe settings and the policy version, so a restart reads it instantly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..codec import FORMAT_VERSION
from ..config import SpectrumConfig

# Bump when the probe's trials, decision rule or the codec policy changes.
PROBE_POLICY_VERSION = 1


class ProbeEngine(Protocol):
    def full_answer(self, input_ids: torch.Tensor) -> str: ...

    def degraded_answer(self, input_ids: torch.Tensor, config: SpectrumConfig) -> str: ...


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe runs; part of the cache key."""

    budget: float = 0.3
    trials: int = 3
    context: int = 2048
    min_context: int = 512
    depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    seed: int = 1234
    allocator: str = "paper"
    max_new_tokens: int = 10
    rotation: str = "none"  # the codec the server will really use
    group_size: int | None = None
    key_scales: str = "token"

    def config(self) -> SpectrumConfig:
        """The aggressive 3-tier policy the trials run under."""
        return SpectrumConfig(
            budget=self.budget,
            tiers="3",
            allocator=self.allocator,
            rotation=self.rotation,
            group_size=self.group_size,
            key_scales=self.key_scales,
        )

    def key(self) -> str:
        fields = asdict(self)
        if fields["key_scales"] == "token":  # keys of caches made before the option existed
            del fields["key_scales"]
        blob = json.dumps(fields, sort_keys=True) + f"|p{PROBE_POLICY_VERSION}|f{FORMAT_VERSION}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ProbeResult:
    """The decision and its evidence."""

    decision: str  # "3" or "2"
    passed: bool
    reason: str
    context: int
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False
    policy_version: int = PROBE_POLICY_VERSION

    def summary(self) -> str:
        ok = sum(t["degraded_ok"] for t in self.trials)
        return (
            f"INT4 probe: {'PASS' if self.passed else 'FAIL'} -> tiers {self.decision}"
            f" ({ok}/{len(self.trials)} trials retrieved at 3-tier; {self.reason};"
            f" {self.seconds:.1f}s{', cached' if self.cached else ''})"
        )


def run_probe(
    engine: ProbeEngine, tokenizer, settings: ProbeSettings | None = None, text: str | None = None
) -> ProbeResult:
    """Run the trials; deterministic for a given model, tokenizer and settings."""
    from .niah import answer_matches, make_trial
    from .ppl import load_wikitext

    s = settings or ProbeSettings()
    t0 = time.perf_counter()
    text = text if text is not None else load_wikitext()
    hay = tokenizer(text[:400_000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    config = s.config()
    context = s.context
    while True:
        depths = [s.depths[i % len(s.depths)] for i in range(s.trials)]
        trials = [make_trial(tokenizer, hay, context, d, s.seed + i) for i, d in enumerate(depths)]
        records = []
        for trial in trials:
            full = engine.full_answer(trial.input_ids)
            records.append(
                {
                    "context": context,
                    "depth": trial.depth,
                    "needle": trial.needle,
                    "full_answer": full,
                    "full_ok": answer_matches(full, trial.needle),
                }
            )
        if any(r["full_ok"] for r in records) or context // 2 < s.min_context:
            break
        context //= 2
    usable = [(t, r) for t, r in zip(trials, records) if r["full_ok"]]
    for trial, r in zip(trials, records):
        if r["full_ok"]:
            answer = engine.degraded_answer(trial.input_ids, config)
            r.update(degraded_answer=answer, degraded_ok=answer_matches(answer, trial.needle))
        else:
            r.update(degraded_answer=None, degraded_ok=False)
    if not usable:
        passed, reason = False, f"full precision never retrieved (down to {context} tokens)"
    else:
        passed = all(r["degraded_ok"] for _, r in usable)
        reason = f"{sum(r['degraded_ok'] for _, r in usable)}/{len(usable)} usable trials kept"
    return ProbeResult(
        decision="3" if passed else "2",
        passed=passed,
        reason=reason,
        context=context,
        trials=records,
        seconds=time.perf_counter() - t0,
    )


def probe_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    from ..models import cache_root

    return Path(cache_dir) if cache_dir else cache_root() / "probe"


def read_cached_probe(
    weights_id: str,
    settings: ProbeSettings | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ProbeResult | None:
    """The cached decision for (weights, settings, policy), or None (none, unreadable,
    another policy version)."""
    s = settings or ProbeSettings()
    path = probe_cache_dir(cache_dir) / f"{weights_id[:32]}-{s.key()}.json"
    if not path.is_file():
        return None
    try:
        result = ProbeResult(**{**json.loads(path.read_text()), "cached": True})
    except (ValueError, TypeError):
        return None  # unreadable cache: run again
    return result if result.policy_version == PROBE_POLICY_VERSION else None


def cached_probe(
    weights_id: str,
    run: callable,
    settings: ProbeSettings | None = None,
    refresh: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ProbeResult:
    """Return the cached decision for (weights, settings, policy) or run and store it.

    ``run`` is a zero-argument callable returning a :class:`ProbeResult`.
    """
    s = settings or ProbeSettings()
    folder = probe_cache_dir(cache_dir)
    path = folder / f"{weights_id[:32]}-{s.key()}.json"
    cached = None if refresh else read_cached_probe(weights_id, s, cache_dir)
    if cached is not None:
        return cached
    result = run()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**asdict(result), "cached": False}, indent=1))
    os.replace(tmp, path)
    return result
