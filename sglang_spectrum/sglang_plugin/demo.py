"""``spectrumkv demo``: a real PD deployment with the spectrum backend, request by request.

Starts a prefill server, a decode server (SGLang, ``--disaggregation-transfer-backend
spectrum``) and the router on free ports (:mod:`.launch`), sends a few prompts
(one holding a secret only in a ~1,500-token prompt), prints per request the
16-bit KV size vs the bytes that crossed Mooncake, the tier histogram, the
pack / transfer / unpack times and the answer, then stops every process by
PID (also on Ctrl-C, SIGTERM or failure).
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from typing import Any

SECRET = "48151623"
FILLER = "The grass is green. The sky is blue. The sun is warm. "
PROMPTS = [
    ("short", "The capital of France is", 12),
    ("code", "def fibonacci(n):", 24),
    ("medium", "A short story about a lighthouse keeper. " * 30 + "The keeper", 16),
    (
        "secret",
        f"The secret code is {SECRET}. Remember it. "
        + FILLER * 110
        + "Question: what is the secret code? Answer: the secret code is",
        12,
    ),
]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _row(cells: list[Any], widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def pd_demo(model: str = "smollm2-135m", budget: float = 0.5, tiers: str = "auto") -> int:
    """Run the PD demo; returns a process exit code (0 = every request served)."""
    from sglang_spectrum.models import ensure_model

    from .launch import DeploymentError, PDDeployment

    model_path = ensure_model(model)
    log_dir = tempfile.mkdtemp(prefix="spectrumkv-demo-")
    d = PDDeployment(
        model_path,
        backend="spectrum",
        prefill_args=["--spectrum-budget", f"{budget:g}", "--spectrum-tiers", tiers],
        router_args=["--disable-retries"],
        stats=True,
        log_dir=log_dir,
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C stops the deployment even where SIGINT came in ignored (background jobs)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    ok = True
    try:
        _say(
            f"starting prefill + decode + router (spectrum, budget {budget:g}, tiers {tiers},"
            f" model {model}); logs in {log_dir}"
        )
        d.start()
        _say(f"ready in {d.startup_s:.0f} s: router {d.router_url}")
        widths = [7, 6, 12, 12, 6, 16, 8, 8, 9]
        print(
            _row(
                [
                    "request",
                    "tokens",
                    "16-bit KV",
                    "sent bytes",
                    "ratio",
                    "fp16/int8/int4",
                    "pack ms",
                    "xfer ms",
                    "unpack ms",
                ],
                widths,
            )
            + "  answer"
        )
        for i, (name, prompt, max_new) in enumerate(PROMPTS):
            rid = f"demo-{i}-{name}-{int(time.time() * 1000)}"
            t0 = time.monotonic()
            try:
                out = d.generate(prompt, max_new_tokens=max_new, rid=rid)
            except Exception as e:
                ok = False
                print(f"{name:>7}  request failed: {e}")
                continue
            latency = time.monotonic() - t0
            rec = {s["role"]: s for s in d.spectrum_stats() if s.get("rid") == rid}
            p, dec = rec.get("prefill", {}), rec.get("decode", {})
            t = p.get("tiers", {})
            answer = out["text"].strip().replace("\n", " ")[:60]
            print(
                _row(
                    [
                        name,
                        p.get("num_tokens", "?"),
                        f"{p.get('full_bytes', 0):,}",
                        f"{p.get('sent_bytes', 0):,}",
                        f"{p.get('ratio', float('nan')):.3f}",
                        f"{t.get('fp16', 0)}/{t.get('int8', 0)}/{t.get('int4', 0)}",
                        f"{p.get('pack_ms', float('nan')):.1f}",
                        f"{p.get('transfer_ms', float('nan')):.1f}",
                        f"{dec.get('unpack_ms', float('nan')):.1f}",
                    ],
                    widths,
                )
                + f"  {answer!r} ({latency:.1f} s)"
            )
            if name == "secret" and SECRET not in out["text"]:
                ok = False
                _say(f"the secret {SECRET} was not recalled from the long prompt")
        sent = [s for s in d.spectrum_stats() if s["role"] == "prefill"]
        if sent:
            total = sum(s["sent_bytes"] for s in sent) / sum(s["full_bytes"] for s in sent)
            mode = sent[-1].get("tier_mode", "?")
            _say(
                f"{len(sent)} transfers, {total:.3f} of the 16-bit KV bytes crossed Mooncake"
                f" (tier mode {mode}; short prompts pay the header and FP16 sinks)"
            )
    except KeyboardInterrupt:
        ok = False
        _say("interrupted")
    except DeploymentError as e:
        ok = False
        _say(f"deployment failed: {e}")
    finally:
        _say("stopping all processes")
        d.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return 0 if ok else 1
