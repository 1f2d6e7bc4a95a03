"""Needle-in-a-haystack retrieval through the PD transfer path.

A trial hides ``The special magic number is NNNNNNN.`` at a depth of a WikiText
haystack, asks for it at the end (the model's chat template, a clear
instruction and an answer prefix), prefills the prompt once at full precision
(the prefill node, which also produces the first answer token), then, for
every method and budget, sends the prompt KV through the codec and decodes
greedily on the degraded cache (the decode node). A trial passes when the
first number in the answer equals the needle.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..config import SpectrumConfigError
from .methods import AutoTiers, Method, record_base, resolve_runs
from .ppl import load_wikitext
from .runner import KVScales, apply_method, run_needs

QUESTION = (
    "What is the special magic number mentioned in the text above? Answer with the number only."
)
INSTRUCTION = "Read the following text carefully. A special magic number is hidden in it.\n\n"
ANSWER_PREFIX = "The special magic number is"
_PLACEHOLDER = "<<<SPECTRUM-NIAH>>>"


@dataclass(frozen=True)
class NiahTrial:
    """One prompt: token ids, the needle number and where it sits."""

    input_ids: torch.Tensor  # int64 [T]
    needle: str
    depth: float
    context: int


def _template_parts(tokenizer) -> tuple[str, str]:
    """Text before and after the user's content, generation prompt and answer prefix included."""
    messages = [{"role": "user", "content": _PLACEHOLDER}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # no chat template: plain prompt
        text = f"{_PLACEHOLDER}\n"
    before, after = text.split(_PLACEHOLDER)
    return before, after + ANSWER_PREFIX


def make_trial(
    tokenizer, haystack_ids: torch.Tensor, context: int, depth: float, seed: int
) -> NiahTrial:
    """Build a prompt of exactly ``context`` tokens with the needle at ``depth`` in [0, 1]."""
    rng = random.Random(seed)
    needle = str(rng.randrange(1_000_000, 10_000_000))
    before, after = _template_parts(tokenizer)

    def enc(s: str) -> torch.Tensor:
        return tokenizer(s, return_tensors="pt", add_special_tokens=False).input_ids[0]

    head = enc(before + INSTRUCTION)  # a template's BOS is part of its text
    tail = enc("\n\n" + QUESTION + after)
    needle_ids = enc(f" The special magic number is {needle}. ")
    room = context - head.numel() - tail.numel() - needle_ids.numel()
    if room < 16:
        raise SpectrumConfigError(f"context {context} is too short for a haystack")
    start = rng.randrange(0, max(1, haystack_ids.numel() - room))
    hay = haystack_ids[start : start + room]
    at = round(depth * room)
    ids = torch.cat([head, hay[:at], needle_ids, hay[at:], tail])
    return NiahTrial(input_ids=ids, needle=needle, depth=depth, context=int(ids.numel()))


def make_trials(
    tokenizer, context: int, trials: int, seed: int = 0, text: str | None = None
) -> list[NiahTrial]:
    """``trials`` prompts with depths evenly spread over [0, 1]."""
    text = text if text is not None else load_wikitext()
    hay = tokenizer(text[:2_000_000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    depths = [i / max(1, trials - 1) for i in range(trials)]
    return [make_trial(tokenizer, hay, context, d, seed * 1000 + i) for i, d in enumerate(depths)]


def answer_matches(answer: str, needle: str) -> bool:
    """Exact match of the first number in the answer."""
    found = re.search(r"\d+", answer.replace(",", ""))
    return bool(found) and found.group(0) == needle


def evaluate_niah(
    model,
    tokenizer,
    runs: list[tuple[Method, str, float]] | None = None,
    *,
    methods: list[str] | None = None,
    budgets: list[float] | None = None,
    allocators: list[str] | None = None,
    context: int = 4096,
    trials: int = 20,
    max_new_tokens: int = 10,
    auto_tiers: AutoTiers = "2",
    obs_window: int = 32,
    kv_scales: KVScales | None = None,
    seed: int = 0,
    text: str | None = None,
    progress: bool = True,
    details: list | None = None,
) -> list[dict]:
    """Accuracy and retention (accuracy / full accuracy on the same trials) per run.

    Records carry ``hits`` (pass/fail per trial, in trial order) so that two methods can
    be compared trial by trial; FP8 baselines add ``kv_scales``.
    """
    from .hf_bridge import prefill

    runs = resolve_runs(runs, methods, budgets, allocators)
    full_keys, kv_scales = run_needs(model, runs, kv_scales)
    prompts = make_trials(tokenizer, context, trials, seed, text)
    hits = {i: [] for i in range(len(runs))}
    ratios = {i: [] for i in range(len(runs))}
    bar = tqdm(total=len(prompts) * len(runs), desc=f"niah@{context}", disable=not progress)
    for trial in prompts:
        kv = prefill(model, trial.input_ids[None], obs_window=obs_window, full_keys=full_keys)
        memo: dict = {}
        for i, (method, alloc, budget) in enumerate(runs):
            tokens, ratio = apply_method(
                model,
                kv,
                method,
                alloc,
                budget,
                auto_tiers,
                max_new_tokens=max_new_tokens,
                memo=memo,
                eos_token_id=tokenizer.eos_token_id,
                kv_scales=kv_scales,
            )
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            hits[i].append(answer_matches(answer, trial.needle))
            ratios[i].append(ratio)
            if details is not None:
                details.append(
                    {
                        "method": method.name,
                        "allocator": alloc,
                        "budget": budget,
                        "depth": trial.depth,
                        "needle": trial.needle,
                        "answer": answer,
                    }
                )
            bar.update(1)
    bar.close()
    full_idx = next(i for i, (m, _, _) in enumerate(runs) if m.base == "full")
    full_acc = sum(hits[full_idx]) / len(prompts)
    records = []
    for i, (method, alloc, budget) in enumerate(runs):
        n = len(hits[i])
        acc = sum(hits[i]) / n
        se = (acc * (1 - acc) / n) ** 0.5
        base = record_base(method, alloc, budget, context, ratios[i])
        base["hits"] = [bool(h) for h in hits[i]]
        if method.is_pool_cast:
            base["kv_scales"] = kv_scales.source
        records.append({**base, "metric": "niah_acc", "value": acc, "stderr": se})
        if full_acc > 0:
            # Retention on the same trials: passes among the trials full precision passed.
            both = sum(h and f for h, f in zip(hits[i], hits[full_idx]))
            records.append(
                {
                    **base,
                    "metric": "niah_retention",
                    "value": acc / full_acc,
                    "stderr": se / full_acc,
                    "retained_of_full": both,
                }
            )
    return records
