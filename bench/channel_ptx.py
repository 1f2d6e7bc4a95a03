"""Static counts of the per-channel key pack kernel for sm_90, on the CPU (no GPU): its
default launch shape with and without ``ChannelTuning.fill_rows`` (the ``FILL``
constexpr), compiled by Triton's own ptxas as ``tests/test_kernels_compile.py`` does,
specialised as a launch on the device is (16-aligned pointers, 32 layers), and read
back with Triton's own ``cuobjdump``:

- PTX: instructions, selects and global loads of the whole kernel (both tier branches);
- SASS: registers a thread and stack (spills), the instructions every program runs
  before the tier branch and those of the INT8 branch; their sum over the elements a
  thread quantises is the kernel's issue cost per element.

ncu put this kernel at 60 % of the SMs' issue throughput against 45 % of DRAM's
(H100; ``bench/results/gpu_calls/2026-12-05-s12/call1/ncu.log``): it is bound by the
instructions it issues, so the SASS count per element is what a faster variant cuts.
Not a timing: what an option removes, before a GPU times it. The registers match the
device's only under the device's Triton (3.6: ``triton`` in the result).

Usage (CPU; the device's Triton in a throwaway venv)::

    python3 -m venv /tmp/tri36 && /tmp/tri36/bin/pip install torch==2.13.0 triton==3.6.0 \\
        msgspec pytest && /tmp/tri36/bin/pip install --no-deps -e .
    PYTHONSAFEPATH=1 /tmp/tri36/bin/python bench/channel_ptx.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from sglang_spectrum.kernels import channel  # noqa: E402
from test_kernels_compile import compile_for_h200  # noqa: E402

CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
KB = 64  # rows of a key block (the default key_block)
SASS_LINE = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(@!?P\d\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [str(CUOBJDUMP), flag, f.name], capture_output=True, text=True, check=True
        ).stdout


def sass_counts(cubin: bytes) -> dict:
    """Registers, stack and the instructions of the prologue and of the INT8 branch (the
    longest forward predicated branch: it jumps over that tier's code to the INT4's)."""
    ins = [m for m in map(SASS_LINE.match, cuobjdump(cubin, "-sass").splitlines()) if m]
    jumps = [
        (int(m[1], 16), int(m[4].split("0x")[1].split()[0].rstrip(";"), 16))
        for m in ins
        if m[2] and m[3] == "BRA" and "0x" in m[4]
    ]
    at, to = max(jumps, key=lambda j: j[1] - j[0])
    usage = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump(cubin, "-res-usage"))
    return {
        "registers": int(usage[1]),
        "stack_bytes": int(usage[2]),
        "sass_instructions": len(ins),
        "sass_prologue": at // 16,
        "sass_int8_branch": (to - at) // 16,
    }


def counts(fill: bool) -> dict:
    """PTX and SASS counts of ``_pack_channel_kernel`` at the default shape (bf16)."""
    tables = {"src_ptrs": "*i64", "rows": "*i64", "meta": "*i64", "payload": "*u8"}
    args = {**tables, "scales": "*fp32"}
    args.update(dict.fromkeys(("b1", "n0", "n1", "num_layers", "h0"), "i32"))
    tuning = channel.DEFAULT_TUNING
    consts = dict(
        H=8, HP=8, D=128, DC=tuning.channels, KB=KB, IDX=tl.int32, HG=1, HEAD_MAJOR=True,
        SRC=tl.bfloat16, NARROW=tuning.narrow, FILL=fill,
    )  # fmt: skip
    divisible = (*tables, "scales", "num_layers")  # b1, n0, n1, h0: do_not_specialize
    kernel = compile_for_h200(
        channel._pack_channel_kernel, args, consts, tuning.num_warps, divisible
    )
    body = [
        line.strip()
        for line in kernel.asm["ptx"].splitlines()
        if re.match(r"\s+[@a-z]", line) and not line.strip().startswith(".")
    ]
    sass = sass_counts(kernel.asm["cubin"])
    per_thread = KB * tuning.channels // (32 * tuning.num_warps)
    program = sass["sass_prologue"] + sass["sass_int8_branch"]
    return {
        "fill_rows": fill,
        "ptx_instructions": len(body),
        "selects": sum("selp" in x for x in body),
        "global_loads": sum("ld.global" in x for x in body),
        **sass,
        "elements_per_thread": per_thread,
        "sass_per_int8_program": program,
        "sass_per_element": round(program / per_thread, 2),
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
    print(f"triton {triton.__version__}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
