"""`spectrumkv`: the command line of SpectrumKV.

spectrumkv demo                      the main job (see README)
spectrumkv models fetch NAME...      download + convert the stand-in models
spectrumkv probe --model M           the INT4-tolerance probe (cached)
spectrumkv eval ppl  --model M ...   PD perplexity protocol on WikiText-2
spectrumkv eval niah --model M ...   needle in a haystack
spectrumkv eval plot|report          plots / markdown from the JSON results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import SpectrumError

DEFAULT_RESULTS = Path("bench/results/quality.json")
DEVICE_HELP = "where the HF model runs: auto (cuda if available), cpu, cuda, cuda:N"


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpectrumError(f"--device {name}: no CUDA device is available here")
    return name


def _hardware(device: str) -> str:
    """What the model ran on, for the result records."""
    import torch

    dev = _device(device)
    return torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"


def _load(model: str, attn: str = "sdpa", device: str = "auto"):
    from .models import load_model

    # sdpa honours the bridge's additive masks (tested) and is much faster than
    # eager on long prompts. fp32 matmuls stay full fp32 on the GPU (no TF32).
    return load_model(model, attn_implementation=attn, device=_device(device))


def _model_label(model: str) -> str:
    return Path(model).name if Path(model).is_dir() else model


def _auto_tiers(model: str, args):
    """``spectrum-auto``'s tiers per method: the cached probe decision for the
    method's codec (the probe runs once per codec if not cached)."""
    decisions: dict = {}

    def resolve(method) -> str:
        key = (method.rotation, method.group_size, method.key_scales)
        if key not in decisions:
            result = _run_probe(model, False, args.probe_budget, *key, args.device)
            print(result.summary(), file=sys.stderr)
            decisions[key] = result.decision
        return decisions[key]

    return resolve


def _run_probe(
    model: str,
    refresh: bool,
    budget: float = 0.3,
    rotation: str = "none",
    group_size: int | None = None,
    key_scales: str = "token",
    device: str = "auto",
):
    from .eval.probe import ProbeSettings, cached_probe, run_probe
    from .eval.runner import HFProbeEngine
    from .models import ensure_model, weights_identity

    settings = ProbeSettings(
        budget=budget, rotation=rotation, group_size=group_size, key_scales=key_scales
    )
    path = ensure_model(model)

    def run():
        m, tok = _load(model, device=device)
        return run_probe(HFProbeEngine(m, tok, settings.max_new_tokens), tok, settings)

    return cached_probe(weights_identity(path), run, settings, refresh=refresh)


def probe_record(model: str, result, args) -> dict:
    passed = sum(t["degraded_ok"] for t in result.trials)
    codec = "" if args.rotation == "none" else "+had"
    codec += f"+g{args.group_size}" if args.group_size else ""
    codec += "+kc" if args.key_scales == "channel" else ""
    return {
        "model": model,
        "method": f"probe{codec}",
        "allocator": "paper",
        "budget": args.budget,
        "metric": "probe_int4_pass",
        "context": result.context,
        "value": float(result.passed),
        "n": len(result.trials),
        "stderr": None,
        "bytes_ratio": None,
        "decision": result.decision,
        "passed_trials": passed,
        "seconds": result.seconds,
        "reason": result.reason,
    }


def cmd_probe(args) -> int:
    result = _run_probe(
        args.model,
        args.refresh,
        args.budget,
        args.rotation,
        args.group_size,
        args.key_scales,
        args.device,
    )
    print(result.summary())
    for t in result.trials:
        print(
            f"  depth {t['depth']:.2f} ctx {t['context']}: needle {t['needle']}"
            f" full={t['full_answer']!r} 3-tier={t['degraded_answer']!r}"
        )
    if args.out:
        from .eval.report import merge_records

        merge_records(args.out, [probe_record(_model_label(args.model), result, args)])
    return 0


def _write(args, records: list[dict], kind: str) -> None:
    from .eval.report import markdown_tables, merge_records

    label = _model_label(args.model)
    hardware = _hardware(args.device)
    for r in records:
        r["model"] = label
        r["hardware"] = hardware
    merged = merge_records(args.out, records)
    md = Path(args.out).with_suffix(".md")
    md.write_text(markdown_tables(merged))
    for r in records:
        if r["metric"] in ("ppl_delta_pct", "niah_acc"):
            extra = f" bytes={r['bytes_ratio']:.3f}"
            print(
                f"{label} {kind} {r['method']:<22} {r['allocator']:<8} b={r['budget']:<5g}"
                f" {r['metric']}={r['value']:.4g}{extra}"
            )
    print(f"wrote {args.out} and {md}")


def _kv_scales(args, model):
    """``--fp8-kv-scales JSON`` (SGLang's --quantization-param-path), else None: the
    FP8 baselines then use the checkpoint's scales (1.0 when it has none)."""
    if not args.fp8_kv_scales:
        return None
    from .eval.hf_bridge import layer_types
    from .eval.runner import quantization_param_kv_scales

    return quantization_param_kv_scales(args.fp8_kv_scales, len(layer_types(model)))


def cmd_eval_ppl(args) -> int:
    from .eval.methods import expand_runs
    from .eval.ppl import evaluate_ppl, load_wikitext

    runs = expand_runs(args.methods, args.budgets, args.allocators)
    auto = _auto_tiers(args.model, args)
    model, tok = _load(args.model, args.attn, args.device)
    records = evaluate_ppl(
        model,
        tok,
        runs,
        context=args.context,
        continuation=args.continuation,
        windows=args.windows,
        text=load_wikitext(args.wikitext),
        auto_tiers=auto,
        kv_scales=_kv_scales(args, model),
    )
    _write(args, records, "ppl")
    return 0


def cmd_eval_niah(args) -> int:
    from .eval.methods import expand_runs
    from .eval.niah import evaluate_niah
    from .eval.ppl import load_wikitext

    runs = expand_runs(args.methods, args.budgets, args.allocators)
    auto = _auto_tiers(args.model, args)
    model, tok = _load(args.model, args.attn, args.device)
    text = load_wikitext(args.wikitext)
    details: list = []
    records = []
    kv_scales = _kv_scales(args, model)
    for context in args.context:
        records += evaluate_niah(
            model,
            tok,
            runs,
            context=context,
            trials=args.trials,
            auto_tiers=auto,
            text=text,
            details=details,
            kv_scales=kv_scales,
        )
    _write(args, records, "niah")
    if args.details:
        Path(args.details).write_text(json.dumps(details, indent=1))
    return 0


def cmd_eval_plot(args) -> int:
    from .eval.report import plot_records

    records = json.loads(Path(args.input).read_text())
    for p in plot_records(records, args.out_dir):
        print(f"wrote {p}")
    return 0


def cmd_eval_report(args) -> int:
    from .eval.report import markdown_tables

    records = json.loads(Path(args.input).read_text())
    text = markdown_tables(records)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_models_fetch(args) -> int:
    from .models import ensure_model

    for name in args.names:
        print(ensure_model(name))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from .eval.methods import DEFAULT_BUDGETS, DEFAULT_METHODS

    p = argparse.ArgumentParser(prog="spectrumkv", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: a PD deployment on the default model")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--budget", type=float, default=0.5)
    d.add_argument(
        "--codec-only",
        action="store_true",
        help="only run the codec on a real prompt's KV (no servers)",
    )
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="the stand-in models")
    msub = m.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="download, verify and convert models")
    f.add_argument("names", nargs="+")
    f.set_defaults(func=cmd_models_fetch)

    pr = sub.add_parser("probe", help="INT4-tolerance probe (decision cached on disk)")
    pr.add_argument("--model", required=True)
    pr.add_argument("--budget", type=float, default=0.3)
    pr.add_argument("--refresh", action="store_true", help="ignore the cached decision")
    pr.add_argument("--rotation", choices=["none", "hadamard"], default="none")
    pr.add_argument(
        "--key-scales",
        choices=["token", "channel"],
        default="token",
        help="channel: INT8/INT4 keys scaled per channel over 64-token blocks (KIVI)",
    )
    pr.add_argument("--group-size", type=int, default=None)
    pr.add_argument("--out", default=None, help="also merge a record into this JSON")
    pr.add_argument("--device", default="auto", help=DEVICE_HELP)
    pr.set_defaults(func=cmd_probe)

    e = sub.add_parser("eval", help="quality evaluation")
    esub = e.add_subparsers(dest="eval_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="short name or HF folder")
    common.add_argument("--methods", type=_names, default=list(DEFAULT_METHODS))
    common.add_argument("--budgets", type=_floats, default=list(DEFAULT_BUDGETS))
    common.add_argument("--allocators", type=_names, default=["paper", "optimal"])
    common.add_argument("--wikitext", default=None, help="path to wiki.test.raw")
    common.add_argument("--out", default=str(DEFAULT_RESULTS))
    common.add_argument("--probe-budget", type=float, default=0.3)
    common.add_argument(
        "--fp8-kv-scales",
        default=None,
        metavar="JSON",
        help="per-layer FP8 KV scales for fp8_e4m3/fp8_e5m2 in SGLang's"
        " --quantization-param-path format (default: the checkpoint's, else 1.0)",
    )
    common.add_argument("--device", default="auto", help=DEVICE_HELP)
    common.add_argument(
        "--attn",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="attention implementation of the HF model",
    )
    pp = esub.add_parser("ppl", parents=[common], help="PD perplexity on WikiText-2")
    pp.add_argument("--context", type=int, default=1024)
    pp.add_argument("--continuation", type=int, default=256)
    pp.add_argument("--windows", type=int, default=16)
    pp.set_defaults(func=cmd_eval_ppl)
    nh = esub.add_parser("niah", parents=[common], help="needle in a haystack")
    nh.add_argument("--context", type=lambda s: [int(x) for x in s.split(",")], default=[4096])
    nh.add_argument("--trials", type=int, default=20)
    nh.add_argument("--details", default=None, help="write per-trial answers here")
    nh.set_defaults(func=cmd_eval_niah)
    pl = esub.add_parser("plot", help="PNG plots from a results JSON")
    pl.add_argument("--input", default=str(DEFAULT_RESULTS))
    pl.add_argument("--out-dir", default="bench/results")
    pl.set_defaults(func=cmd_eval_plot)
    rp = esub.add_parser("report", help="markdown tables from a results JSON")
    rp.add_argument("--input", default=str(DEFAULT_RESULTS))
    rp.add_argument("--out", default=None)
    rp.set_defaults(func=cmd_eval_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpectrumError as exc:
        print(f"spectrumkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
