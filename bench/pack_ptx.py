"""Static counts of the main pack kernel (``kernels/pack.py``: per-token scales, the V rows
of every request and the K rows of token-key layouts) and of its unpack twin
(``kernels/unpack.py``) for sm_90, on the CPU (no GPU), as ``bench/channel_ptx.py``
counts the per-channel key kernel: compiled by Triton's own
ptxas, specialised as a launch on the device is (16-aligned pointers, 32 layers), at the
launch shape the device runs (``pack.PACK_SHAPE``: 32 rows of 128 elements, 4 warps), and
read back with Triton's own ``cuobjdump``. Per INT8 program: the instructions before
the tier branch that such a program runs (the FP16 tier's block it jumps over is not
counted) and those of its tier's branch (an if/else counts its shorter side, the
unclamped quantiser a block of ordinary values takes), over the elements a thread
quantises. Not a timing: what a change removes, before a GPU times it.

Usage (CPU; the device's Triton in the throwaway venv of ``bench/channel_ptx.py``)::

    PYTHONSAFEPATH=1 /tmp/tri36/bin/python bench/pack_ptx.py --out bench/results
    # -> bench/results/pack_ptx_triton3.6.0.json (--label X: pack_ptx_triton3.6.0_X.json)
"""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from channel_ptx import sass_counts  # noqa: E402
from sglang_spectrum.kernels import pack, unpack  # noqa: E402
from test_kernels_compile import compile_for_h200  # noqa: E402

D, WARPS = 128, pack.PACK_SHAPE[1]
BR = pack.PACK_SHAPE[0] // D
VARIANTS = {  # name: constexprs over the common ones (a kernel's own names only)
    "values (channel-key layouts), bf16 words": dict(INT_KEYS=False, WORDS=True),
    "keys and values (token-key layouts), bf16 words": dict(INT_KEYS=True, WORDS=True),
    "values, fp16 pools": dict(INT_KEYS=False, WORDS=False, SRC=tl.float16, WIRE=tl.float16),
    "unpack: keys and values, bf16 pools": dict(DST=tl.bfloat16, SOFT_BF16=False),
}


def counts(name: str, consts: dict) -> dict:
    ints = dict.fromkeys(("blk_lo", "b1", "b2", "n0", "n1", "n2", "num_layers", "h0"), "i32")
    if name.startswith("unpack"):
        fn = unpack._unpack_kernel
        tables = {"payload": "*u8", "dst_ptrs": "*i64", "rows": "*i64", "meta": "*i64"}
        tables.update(src_scales="*fp32", dst_scales="*fp32")
    else:
        fn = pack._pack_kernel
        tables = {"src_ptrs": "*i64", "rows": "*i64", "meta": "*i64", "payload": "*u8"}
        tables.update(scales="*fp32")
    base = dict(SRC=tl.bfloat16, WIRE=tl.bfloat16, H=8, HP=8, D=D, G=1, BR=BR, RZ=True)
    params = inspect.signature(fn.fn).parameters
    consts = {k: v for k, v in {**base, "IDX": tl.int32, **consts}.items() if k in params}
    divisible = (*tables, "num_layers")
    kernel = compile_for_h200(fn, {**tables, **ints}, consts, WARPS, divisible)
    sass = sass_counts(kernel.asm["cubin"])
    per_thread = BR * D // (32 * WARPS)
    program = sass["sass_prologue"] + sass["sass_int8_branch"]
    return {
        "variant": name,
        **sass,
        "elements_per_thread": per_thread,
        "sass_per_int8_program": program,
        "sass_per_element": round(program / per_thread, 2),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--label", default="", help="a suffix of the result's file name")
    args = ap.parse_args(argv)
    rows = [counts(name, consts) for name, consts in VARIANTS.items()]
    result = {"hardware": "cpu (compiled for sm_90)", "triton": triton.__version__, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.label}" if args.label else ""
    name = f"pack_ptx_triton{triton.__version__}{suffix}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"Triton {triton.__version__}, sm_90, the INT8 tier's program ({name}):")
    print("| variant | registers | stack | SASS a program | an element |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['registers']} | {r['stack_bytes']}"
            f" | {r['sass_per_int8_program']} | {r['sass_per_element']} |"
        )


if __name__ == "__main__":
    main()
