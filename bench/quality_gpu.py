"""The quality grid on a GPU machine, as resumable jobs under a deadline.

Every job is one `spectrumkv` invocation writing its own JSON into --out-dir;
a job that finished leaves a `.done` marker and is skipped next time, a job
cut off by the deadline runs again from the start in the next call. NIAH runs
at 4096 tokens and, when full precision retrieves < 95 % there, also at the
longest scanned length where it reaches >= 95 %.

    python bench/quality_gpu.py --model qwen2.5-coder-0.5b --out-dir /tmp/q --deadline 500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_spectrum.eval.report import longest_retrieving_context  # noqa: E402

BUDGETS = "0.25,0.3,0.4,0.5,0.75"
SCAN = (512, 1024, 2048, 3072, 4096)
NIAH_CORE = "full,int4,int4+had+g32,pdtrim,snapkv,spectrum-3tier,spectrum-3tier+had+g32"
NIAH_REST = "full,int8,spectrum-2tier,spectrum-auto,spectrum-auto+had+g32"
NIAH_METHODS = f"{NIAH_CORE},{NIAH_REST.removeprefix('full,')}"
PPL_BASELINES = "full,int8,int4,int4+had+g32,pdtrim,snapkv"
PPL_SPECTRUM = (
    "full,spectrum-3tier,spectrum-2tier,spectrum-auto,spectrum-3tier+had+g32,"
    "spectrum-2tier+had+g32,spectrum-auto+had+g32"
)


def jobs(model: str, out: Path, windows: int, trials: int) -> list[tuple[str, list[str]]]:
    """(name, spectrumkv argv) in priority order; later jobs may read earlier results."""
    sk = ["--model", model]
    scan = out / f"{model}__niah_scan.json"
    niah_any = ["eval", "niah", *sk, "--trials", str(trials)]
    niah = [*niah_any, "--allocators", "paper"]
    todo = [  # NIAH at 4096 in pieces that each fit a device call (~2-5 min on an H200)
        ("niah_4096_core", [*niah, "--methods", NIAH_CORE, "--budgets", "0.3,0.5",
                            "--context", "4096"]),
        ("niah_scan", [*niah, "--methods", "full", "--context", ",".join(map(str, SCAN))]),
        ("niah_4096_rest", [*niah, "--methods", NIAH_REST, "--budgets", BUDGETS,
                            "--context", "4096"]),
        ("niah_4096_budgets", [*niah, "--methods", NIAH_CORE, "--budgets", "0.25,0.4,0.75",
                               "--context", "4096"]),
    ]  # fmt: skip
    if scan.exists():
        best = longest_retrieving_context(json.loads(scan.read_text()), model)
        if best is not None and best < 4096:
            todo.append(
                (f"niah_{best}", [*niah, "--methods", NIAH_METHODS, "--budgets", BUDGETS,
                                  "--context", str(best)])
            )  # fmt: skip
    ppl = ["eval", "ppl", *sk, "--windows", str(windows), "--budgets", BUDGETS]
    todo += [
        ("probe", ["probe", *sk]),
        ("probe_had_g32", ["probe", *sk, "--rotation", "hadamard", "--group-size", "32"]),
        ("ppl_spectrum", [*ppl, "--methods", PPL_SPECTRUM, "--allocators", "paper,optimal"]),
        ("ppl_baselines", [*ppl, "--methods", PPL_BASELINES, "--allocators", "paper"]),
        ("niah_4096_optimal", [*niah_any, "--allocators", "optimal", "--budgets", BUDGETS,
                               "--methods", "full,spectrum-3tier,spectrum-2tier,spectrum-auto",
                               "--context", "4096"]),
    ]  # fmt: skip
    return todo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--deadline", type=float, required=True, help="seconds from now")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--only", default=None, help="comma-separated job names")
    args = ap.parse_args()
    t0 = time.time()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    i = 0
    while True:
        todo = jobs(args.model, args.out_dir, args.windows, args.trials)
        if args.only:
            todo = [j for j in todo if j[0] in args.only.split(",")]
        todo = [j for j in todo if not (args.out_dir / f"{args.model}__{j[0]}.done").exists()]
        left = args.deadline - (time.time() - t0)
        if not todo or left < 30:
            break
        name, argv = todo[0]
        stem = args.out_dir / f"{args.model}__{name}"
        argv = [*argv, "--out", f"{stem}.json"]
        if argv[:2] == ["eval", "niah"]:
            argv += ["--details", f"{stem}_details.json"]
        print(f"[{time.time() - t0:6.0f} s] {name}: spectrumkv {' '.join(argv)}", flush=True)
        started = time.time()
        try:
            with open(f"{stem}.log", "w") as log:
                rc = subprocess.run(
                    [sys.executable, "-m", "sglang_spectrum.cli", *argv],
                    stdout=log, stderr=subprocess.STDOUT, timeout=left,
                ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            print(f"  cut off by the deadline after {time.time() - started:.0f} s", flush=True)
            break
        print(f"  rc={rc} in {time.time() - started:.0f} s", flush=True)
        if rc != 0:
            print(Path(f"{stem}.log").read_text()[-3000:], flush=True)
            return rc
        Path(f"{stem}.done").write_text(f"{time.time() - started:.0f}\n")
        i += 1
    print(f"{i} job(s) done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
