"""How many writes one Mooncake batch takes over TCP on 127.0.0.1, and whether a failed
batch breaks the session (why direct writes go in batches of at most
``direct.MAX_BATCH_WRITES``).

Each case starts two fresh engines (SGLang's wrapper), registers a 4 MiB buffer on each,
makes one ``batch_transfer_sync`` of ``n`` 8-byte writes and then one of 16: the return
codes go to a table and a JSON file (``hardware`` field included).

    python bench/mooncake_batch_limit.py --out bench/results/cpu_runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CASE = """
import os, sys, json
os.environ.setdefault("MC_FORCE_TCP", "1")
import torch
from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
    MooncakeTransferEngine,
)
a, b = (MooncakeTransferEngine(hostname="127.0.0.1", gpu_id=0, ib_device=None) for _ in "ab")
src, dst = torch.randn(1 << 20), torch.zeros(1 << 20)
a.register(src.data_ptr(), src.numel() * 4)
b.register(dst.data_ptr(), dst.numel() * 4)
out = []
for n in (int(sys.argv[1]), 16):
    s = [src.data_ptr() + 8 * i for i in range(n)]
    d = [dst.data_ptr() + 8 * i for i in range(n)]
    out.append(a.batch_transfer_sync(b.get_session_id(), s, d, [8] * n))
print("RESULT", json.dumps(out))
"""


def run_case(n: int) -> tuple[int, int]:
    """(return code of the batch of ``n`` writes, of the batch of 16 after it)."""
    p = subprocess.run(
        [sys.executable, "-c", CASE, str(n)], capture_output=True, text=True, timeout=120
    )
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"case {n} printed no result: {p.stderr.strip().splitlines()[-1:]}")
    first, after = json.loads(line[0][7:])
    return int(first), int(after)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 2049, 2050, 4096])
    ap.add_argument("--out", default="bench/results/cpu_runs")
    args = ap.parse_args(argv)
    from importlib.metadata import PackageNotFoundError, version

    def mooncake_version() -> str:
        for dist in ("mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda"):
            try:
                return f"{dist} {version(dist)}"
            except PackageNotFoundError:
                continue
        return "unknown"

    rows = []
    print("| writes in the batch | its return code | a batch of 16 after it |")
    print("|---|---|---|")
    for n in args.sizes:
        first, after = run_case(n)
        rows.append({"writes": n, "ret": first, "ret_next_16": after})
        print(f"| {n} | {first} | {after} |")
    result = {
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "transport": "tcp, 127.0.0.1",
        "mooncake": mooncake_version(),
        "records": rows,
    }
    out = Path(args.out) / "mooncake_batch_limit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
