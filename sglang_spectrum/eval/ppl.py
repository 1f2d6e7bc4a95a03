"""The PD perplexity protocol on WikiText-2.

Each non-overlapping window holds ``context + continuation + 1`` tokens. The
first ``context`` tokens are prefilled once (the prefill node); their KV goes
through the real codec (``pack_kv`` -> bytes -> ``decode_kv``) for every method
and budget; then the next ``continuation`` tokens are fed on top of the
degraded cache (the decode node; its own tokens stay full precision) and each
predicts the one after it. Perplexity = exp(mean NLL over all predictions);
its change is paired per window against ``full`` on the same windows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import SpectrumConfigError
from .methods import AutoTiers, Method, record_base, resolve_runs
from .runner import KVScales, apply_method, run_needs

WIKITEXT_ENV = "SPECTRUM_WIKITEXT"
_DEFAULT_WIKITEXT = Path(__file__).resolve().parents[2].parent / "shared/data/wikitext-2-raw"
_PACKAGED_WIKITEXT = Path(__file__).resolve().parent / "data" / "wiki.test.raw.gz"
_PACKAGED_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def load_wikitext(path: str | os.PathLike[str] | None = None) -> str:
    """WikiText-2 raw test split as one string, CRLF normalised to LF.

    Looks at ``path``, then ``$SPECTRUM_WIKITEXT``, then ``../shared/data`` next
    to the project, then the copy packaged with this module (``data/``, checked
    against its SHA-256), then the ``datasets`` hub loader.
    """
    candidates = [path, os.environ.get(WIKITEXT_ENV), _DEFAULT_WIKITEXT]
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        if p.is_dir():
            p = p / "wiki.test.raw"
        if p.is_file():
            return p.read_bytes().decode("utf-8").replace("\r\n", "\n")
        if c is path:
            raise FileNotFoundError(f"WikiText file not found: {p}")
    if _PACKAGED_WIKITEXT.is_file():
        import gzip
        import hashlib

        raw = gzip.decompress(_PACKAGED_WIKITEXT.read_bytes())
        if hashlib.sha256(raw).hexdigest() == _PACKAGED_SHA256:
            return raw.decode("utf-8").replace("\r\n", "\n")
    try:
        import datasets  # type: ignore[import-not-found]

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as exc:  # no local copy and no hub: say what to do
        raise FileNotFoundError(
            "WikiText-2 not found: pass --wikitext PATH/wiki.test.raw or set"
            f" ${WIKITEXT_ENV} ({exc.__class__.__name__}: {exc})"
        ) from None
    return "\n".join(r for r in rows if r)


def wikitext_windows(
    tokenizer, text: str, context: int, continuation: int, windows: int
) -> list[torch.Tensor]:
    """``windows`` non-overlapping int64 windows of ``context + continuation + 1`` tokens."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    span = context + continuation + 1
    available = ids.numel() // span
    if available < 1:
        raise SpectrumConfigError(f"text has {ids.numel()} tokens, a window needs {span}")
    return [ids[i * span : (i + 1) * span] for i in range(min(windows, available))]


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float(), targets.to(logits.device), reduction="none"
    )


def plain_hf_nll(model, window: torch.Tensor, context: int) -> torch.Tensor:
    """Reference: one forward pass over the window; NLL of the same targets."""
    with torch.no_grad():
        logits = model(window[None]).logits[0]
    return _nll(logits[context:-1], window[context + 1 :])


def evaluate_ppl(
    model,
    tokenizer,
    runs: list[tuple[Method, str, float]] | None = None,
    *,
    methods: list[str] | None = None,
    budgets: list[float] | None = None,
    allocators: list[str] | None = None,
    context: int = 1024,
    continuation: int = 256,
    windows: int = 16,
    text: str | None = None,
    auto_tiers: AutoTiers = "2",
    obs_window: int = 32,
    kv_scales: KVScales | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run the protocol; returns one record per (method, allocator, budget) and metric.

    Records: ``{"method", "allocator", "budget", "metric": "ppl"|"ppl_delta_pct",
    "context", "value", "n", "stderr", "bytes_ratio", "window_nll"}`` (``window_nll``:
    the mean NLL of each window, for paired comparisons between methods; FP8 baselines
    add ``kv_scales``, where their scales came from). ``kv_scales``: FP8 scales, default
    those of the model's checkpoint (1.0 when it has none).
    """
    from .hf_bridge import prefill  # transformers is only needed here

    runs = resolve_runs(runs, methods, budgets, allocators)
    full_keys, kv_scales = run_needs(model, runs, kv_scales)
    text = text if text is not None else load_wikitext()
    wins = wikitext_windows(tokenizer, text, context, continuation, windows)
    nll = {i: [] for i in range(len(runs))}  # per run: per-window mean NLL
    ratios = {i: [] for i in range(len(runs))}
    bar = tqdm(total=len(wins) * len(runs), desc="ppl", disable=not progress, unit="run")
    for window in wins:
        kv = prefill(model, window[None, :context], obs_window=obs_window, full_keys=full_keys)
        feed = window[None, context:-1]
        targets = window[context + 1 :]
        memo: dict = {}
        for i, (method, alloc, budget) in enumerate(runs):
            mean_nll, ratio = apply_method(
                model,
                kv,
                method,
                alloc,
                budget,
                auto_tiers,
                next_ids=feed,
                memo=memo,
                post=lambda logits: float(_nll(logits, targets).mean()),  # noqa: B023
                kv_scales=kv_scales,
            )
            nll[i].append(mean_nll)
            ratios[i].append(ratio)
            bar.update(1)
    bar.close()
    full_idx = next(i for i, (m, _, _) in enumerate(runs) if m.base == "full")
    full = torch.tensor(nll[full_idx], dtype=torch.float64)
    full_ppl = math.exp(float(full.mean()))
    records = []
    for i, (method, alloc, budget) in enumerate(runs):
        x = torch.tensor(nll[i], dtype=torch.float64)
        n = x.numel()
        ppl = math.exp(float(x.mean()))
        # Paired: the per-window NLL difference to full drives the change's error bar.
        d = x - full
        se_nll = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        se_ppl = float(x.std(unbiased=True) / math.sqrt(n)) * ppl if n > 1 else float("nan")
        base = record_base(method, alloc, budget, context, ratios[i])
        base["window_nll"] = [float(v) for v in nll[i]]
        if method.is_pool_cast:
            base["kv_scales"] = kv_scales.source
        records.append({**base, "metric": "ppl", "value": ppl, "stderr": se_ppl})
        records.append(
            {
                **base,
                "metric": "ppl_delta_pct",
                "value": 100.0 * (ppl / full_ppl - 1.0),
                "stderr": 100.0 * se_nll * ppl / full_ppl,
            }
        )
    return records
