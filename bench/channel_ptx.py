"""Static instruction counts of the per-channel key pack kernel for sm_90, on the CPU (no
GPU): its default launch shape with and without ``ChannelTuning.fill_rows`` (the
``FILL`` constexpr), compiled by Triton's own ptxas as ``tests/test_kernels_compile.py``
does. A count of PTX instructions, selects and global loads in the whole kernel (both
tier branches), not a timing: what the option removes, before a GPU times it.

Usage (CPU)::

    python bench/channel_ptx.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from sglang_spectrum.kernels import channel  # noqa: E402
from test_kernels_compile import compile_for_h200  # noqa: E402


def counts(fill: bool) -> dict:
    """PTX counts of ``_pack_channel_kernel`` at the default shape (bf16, narrow)."""
    tables = {"src_ptrs": "*i64", "rows": "*i64", "meta": "*i64", "payload": "*u8"}
    args = {**tables, "scales": "*fp32"}
    args.update(dict.fromkeys(("b1", "n0", "n1", "num_layers", "h0"), "i32"))
    tuning = channel.DEFAULT_TUNING
    consts = dict(
        H=8, HP=8, D=128, DC=tuning.channels, KB=64, IDX=tl.int32, HG=1, HEAD_MAJOR=True,
        SRC=tl.bfloat16, NARROW=tuning.narrow, FILL=fill,
    )  # fmt: skip
    kernel = compile_for_h200(channel._pack_channel_kernel, args, consts, tuning.num_warps)
    body = [
        line.strip()
        for line in kernel.asm["ptx"].splitlines()
        if re.match(r"\s+[@a-z]", line) and not line.strip().startswith(".")
    ]
    return {
        "fill_rows": fill,
        "ptx_instructions": len(body),
        "selects": sum("selp" in x for x in body),
        "global_loads": sum("ld.global" in x for x in body),
        "cubin_bytes": len(kernel.asm["cubin"]),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    rows = [counts(False), counts(True)]
    result = {"hardware": "cpu (compiled for sm_90)", "triton": triton.__version__, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "channel_ptx_fill_rows.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
