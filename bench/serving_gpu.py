"""SGLang PD serving with SpectrumKV on a GPU: correctness with real weights and TTFT
against stock Mooncake (bf16 and FP8 KV) over several links (issues 12, 16, 17). Runs
on the GPU machine after scripts/gpu_setup.sh, normally through scripts/gpu_serving.sh;
see bench/README.md "GPU deployment".

    python bench/serving_gpu.py --phases correct,speed,report --deadline-s 540
    python bench/serving_gpu.py --dry-run      # the plan, its groups and time estimates

Phases (each selectable; state kept in --state so a later call resumes where the last
one stopped while the machine stays warm; --deadline-s makes a call stop in time and
write what it has):

* ``correct``: SmolLM2-135M (real weights, --smollm), all at once: single servers with
  bf16 and with FP8 (``--kv-cache-dtype fp8_e4m3``) KV, and PD pairs behind
  bench/pd_proxy.py: ``spectrum`` at b=1.0 (greedy outputs must equal the bf16 single
  server's), at --correct-budgets (default codec), ``spectrum-fp8`` at
  --correct-fp8-budgets (b >= 0.5 sends the FP8 bytes: outputs must equal the FP8 single
  server's) and ``spectrum-asym`` (bf16 prefill -> FP8 decode) at --correct-asym-budgets;
  a passcode stated at the start of a ~2.5k-token WikiText prompt must be answered by
  each. The stats lines (SGLANG_SPECTRUM_STATS_FILE) show the path and the timings.
* ``speed``: the Llama-3-8B-shaped dummy model (--model8b); the --configs
  (serving_gpu_configs.py: ``NAME[:BUDGET[:KEYS]][@LINK]``), --group-size PD pairs
  started together on the GPU (each KV pool the bytes of --big-max-tokens 16-bit
  tokens, so an FP8 pool holds twice the tokens), benchmarked one after the other;
  ``sglang.bench_serving --dataset-name random-ids`` through the proxy at every
  --lengths x --concurrency point (serving_gpu_bench.py: in one long-lived process).
  ``--chunked-prefill-size 8192``: the 16384 point is the prompt at 2x the chunk. One
  record per point (serving_gpu_records.py lists the fields).
* ``tp``: TP 2 on two GPUs (greedy identity against a TP-2 single server, per-rank bytes,
  the --tp-points).
* ``spec``: speculative decoding through PD (serving_gpu_spec.py): SmolLM2-135M with
  --spec-algorithm (STANDALONE, the draft being the target itself) on stock mooncake and
  spectrum at --spec-budgets, a single server as the reference; the decode's accept
  length shows whether the draft model's KV arrived. serving_gpu_spec.json / .md.
* ``report``: $OUT/serving_gpu.json (records), serving_gpu.md (tables: TTFT p50 and its
  ratio to stock mooncake and to mooncake-fp8 per length, concurrency and link; decode KV
  capacity), serving_gpu.png, serving_gpu_correct.json, serving_gpu_logs.tgz.

Server flags: --attention-backend flashinfer --grammar-backend none --disable-cuda-graph
--host 127.0.0.1; the link's environment per config. One GPU: every server shares it;
two or more: prefill on GPU 0, decode on GPU 1. ``--cpu`` runs the same on a CPU-only
SGLang (for checking the script here, not for numbers).

Modules (bench/ stays off sys.path; this file loads them by path): serving_gpu_configs
(grammar, plan, estimates), serving_procs (processes, deployments), serving_gpu_bench
(bench_serving worker), serving_gpu_records (records, state), serving_gpu_phases
(phases), serving_gpu_report (tables, plot, merging).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHUNKED_PREFILL = 8192


def _load(name: str):
    """bench/<name>.py, loaded by path and registered under its name (the modules import
    each other by name): bench/ stays off sys.path (its kernels.py would shadow the
    ``kernels`` package transformers probes for)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


for _name in ("serving_gpu_configs", "serving_procs", "serving_gpu_report"):
    _load(_name)
for _name in ("serving_gpu_bench", "serving_gpu_records", "serving_gpu_phases"):
    _load(_name)
configs, phases = sys.modules["serving_gpu_configs"], sys.modules["serving_gpu_phases"]
phase_spec = _load("serving_gpu_spec").phase_spec
procs = sys.modules["serving_procs"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda f: lambda s: [f(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--phases", type=csv(str), default=["correct", "speed", "report"])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/serving_gpu/out"))
    ap.add_argument("--work-dir", default="/tmp/serving_gpu")
    ap.add_argument("--state", default="/tmp/serving_gpu/state.json")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="stop and write by then")
    ap.add_argument("--redo", action="store_true", help="run the correct/tp phase again")
    ap.add_argument(
        "--retry-failed", action="store_true", help="run configs/points that failed before"
    )
    ap.add_argument("--smollm", default=None, help="SmolLM2 folder (default $SPECTRUM_CACHE_DIR)")
    ap.add_argument("--model8b", default="/tmp/model8b")
    ap.add_argument(
        "--configs",
        type=csv(str),
        default=configs.DEFAULT_PLAN.split(","),
        help="NAME[:BUDGET[:KEYS]][@LINK], comma-separated (serving_gpu_configs.py); "
        f"default {configs.DEFAULT_PLAN}",
    )
    ap.add_argument("--key-scales", default=None, help="--spectrum-key-scales (default: server's)")
    ap.add_argument("--min-budget", type=float, default=0.3, help="spectrum:auto's minimum")
    ap.add_argument("--lengths", type=csv(int), default=[4096, 16384])
    ap.add_argument("--concurrency", type=csv(int), default=[1, 4])
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--chunked-prefill", type=int, default=CHUNKED_PREFILL)
    ap.add_argument(
        "--speed-tiers",
        default="3",
        help="--spectrum-tiers for the dummy-weight speed servers (the INT4 probe means "
        "nothing on random weights and falls back to 2 tiers); '' = server default",
    )
    ap.add_argument("--group-size", type=int, default=2, help="speed: PD pairs started together")
    ap.add_argument("--together", action="store_true", help="speed: start every pair at once")
    ap.add_argument(
        "--big-max-tokens",
        type=int,
        default=69632,
        help="KV pool of each 8B server in 16-bit tokens (8.5 GiB; FP8: twice the tokens)",
    )
    ap.add_argument(
        "--bench-mode",
        choices=("worker", "process"),
        default="worker",
        help="bench_serving in one long-lived process (worker) or one process per point",
    )
    ap.add_argument(
        "--tp-points",
        type=lambda s: [tuple(int(v) for v in p.split("x")) for p in s.split(",") if p],
        default=[(16384, 1)],
        help="tp phase: LENxCONC points for mooncake and spectrum b=0.5 at TP 2",
    )
    ap.add_argument(
        "--correct-chunked-prefill",
        type=int,
        default=1024,
        help="correct phase: --chunked-prefill-size (below the secret prompts: parts)",
    )
    ap.add_argument("--correct-budgets", type=csv(float), default=[1.0, 0.5])
    ap.add_argument("--correct-fp8-budgets", type=csv(float), default=[0.5])
    ap.add_argument("--correct-asym-budgets", type=csv(float), default=[0.3])
    ap.add_argument(
        "--correct-budget-s", type=float, default=200.0, help="time the correct phase needs"
    )
    ap.add_argument(
        "--correct-alone",
        action="store_true",
        help="run the correct phase on its own, not while the first 8B group starts",
    )
    ap.add_argument(
        "--spec-algorithm",
        default="STANDALONE",
        choices=["STANDALONE", "EAGLE", "NGRAM"],
        help="spec phase: SGLang's --speculative-algorithm (STANDALONE: the target is its"
        " own draft; EAGLE: a dummy-weight EAGLE head; see serving_gpu_spec.py)",
    )
    ap.add_argument("--spec-budgets", type=csv(float), default=[1.0, 0.5])
    ap.add_argument("--secret-tokens", type=int, default=2500)
    ap.add_argument("--secret-trials", type=int, default=3)
    ap.add_argument("--mem-small", type=float, default=0.85, help="SmolLM2 servers")
    ap.add_argument(
        "--small-max-tokens",
        type=int,
        default=16384,
        help="KV pool of each SmolLM2 server in 16-bit tokens (FP8: twice the tokens)",
    )
    ap.add_argument(
        "--mem-big", type=float, default=0.85, help="8B servers (pools capped by tokens)"
    )
    ap.add_argument("--one-gpu", action="store_true", help="share GPU 0 even with more GPUs")
    ap.add_argument("--startup-timeout-s", type=float, default=420.0)
    ap.add_argument("--request-timeout-s", type=float, default=300.0)
    ap.add_argument("--cpu", action="store_true", help="CPU-only SGLang (checking the script)")
    ap.add_argument("--cpu-max-tokens", type=int, default=16384)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    a = ap.parse_args(argv)
    try:
        configs.parse_configs(a.configs, a.key_scales, a.min_budget)
    except ValueError as e:
        ap.error(str(e))
    return a


def dry_run(r) -> None:
    """The groups still to run, each with its estimate, and the commands of one pair."""
    a, total = r.args, 0.0
    done = r.state.done()
    print(f"  done: {len(done)} points; failed before (skipped): {sorted(r.state['failed'])}")
    for i, (grp, est) in enumerate(r.plan()):
        total += est
        print(f"  group {i + 1} (~{est:.0f} s, cumulative {total:.0f} s):")
        for cfg, pts in grp.items():
            s = ", ".join(f"{L}x{C} ~{r.est.point(cfg, L, C):.0f}s" for L, C in pts)
            print(f"    {cfg.name}: {s}")
    cfg = r.configs[0]
    dep = r.launcher.pair(
        "dry", a.model8b, cfg, (a.mem_big, a.mem_big), ["..."], a.speed_tiers or None,
        bf16_tokens=a.big_max_tokens, start=False,
    )  # fmt: skip
    for p in dep.procs:
        link = {k: p.env[k] for k in configs.LINK_ENV_KEYS if k in p.env}
        print(f"  {p.name}: {link} {shlex.join(p.cmd)}")
    for c in r.configs:
        print(f"  {c.name}: prefill {c.flags('prefill', a.speed_tiers or None)} decode "
              f"{c.flags('decode', a.speed_tiers or None)} env {c.env()}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    r = phases.Runner(args)
    procs.log(
        f"{r.hardware()}; phases {args.phases}; deadline {args.deadline_s:.0f} s; "
        f"state {args.state} ({len(r.state['records'])} records, correct "
        f"{'done' if r.state.get('correct') else 'not done'}); "
        f"configs {', '.join(c.name for c in r.configs)}"
    )
    if args.dry_run:
        dry_run(r)
        return 0
    rc = 0
    # the correct phase runs while the first 8B group starts (unless --correct-alone)
    overlap = "speed" in args.phases and not (args.cpu or args.correct_alone)
    overlap = overlap and "correct" in args.phases and r.correct_todo()
    try:
        if "correct" in args.phases and not overlap:
            r.phase_correct()
        if "tp" in args.phases:
            r.phase_tp()
        if "speed" in args.phases:
            r.phase_speed(with_correct=overlap)
        if "spec" in args.phases:
            phase_spec(r)
    except KeyboardInterrupt:
        rc = 130
    finally:
        r.close()
        r.phase_report() if "report" in args.phases else r.write_outputs()
    return rc


if __name__ == "__main__":
    sys.exit(main())
