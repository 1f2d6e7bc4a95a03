"""Static counts of the per-channel key pack kernel for sm_90, on the CPU (no GPU): its
default launch shape, with ``ChannelTuning.fill_rows`` (the ``FILL`` constexpr), with
``channel_group`` (``CW``), with ``words`` (``WORDS``) and ``load_bytes``
(``WORD_ALIGN``) at the shapes ``bench/channel_kernel.py`` times (``SHAPES`` 17, 26,
28-41), compiled by Triton's own ptxas as ``tests/test_kernels_compile.py`` does,
specialised as a launch on the device is (16-aligned pointers, 32 layers), and read
back with Triton's own ``cuobjdump``:

- PTX: instructions, selects and global loads of the whole kernel (both tier branches);
- SASS: registers a thread and stack (spills), the instructions every program runs
  before the tier branch and those of the INT8 branch; their sum over the elements a
  thread quantises is the kernel's issue cost per element; and the warps an SM holds
  at that register count (16384 registers a scheduler, 32 programs an SM at most; ncu:
  8 warps for the default's 223 registers).

ncu put this kernel at 60 % of the SMs' issue throughput against 45 % of DRAM's
(H100; ``bench/results/gpu_calls/2026-12-05-s12/call1/ncu.log``): it is bound by the
instructions it issues, so the SASS count per element is what a faster variant cuts.
Not a timing: what an option removes, before a GPU times it. The registers match the
device's only under the device's Triton (3.6: ``triton`` in the result); the layouts of
``channel_group`` >= 2 come from Triton's layout heuristics and differ between versions
(3.9 spills them), those of 0 and 1 do not.

Usage (CPU; the device's Triton in a throwaway venv)::

    python3 -m venv /tmp/tri36 && /tmp/tri36/bin/pip install torch==2.13.0 triton==3.6.0 \\
        msgspec pytest && /tmp/tri36/bin/pip install --no-deps -e .
    PYTHONSAFEPATH=1 /tmp/tri36/bin/python bench/channel_ptx.py --out bench/results
    # -> bench/results/channel_ptx_triton3.6.0.json (the CPU venv's Triton: its own file)
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
sys.path.insert(0, str(ROOT / "bench"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from channel_kernel import SHAPES  # noqa: E402
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
    """Registers, stack and the instructions an INT8 program runs: those of the prologue
    (before the tier branch, less any block a forward jump skips there: the main pack
    kernels' FP16 tier, ``sass_skipped``) and of the INT8 branch (the longest forward
    predicated branch over one tier's code: it jumps over the INT8 code to the INT4's;
    a longer one over both INT tiers, as Triton 3.9 lays out the main pack kernels,
    holds two if/else blocks or the INT8 code's exit). Inside that branch an if/else (a
    predicated jump over a block that ends in a jump past the else block: the clamped
    and unclamped quantisers) counts its shorter side, the one a block of ordinary
    values takes."""
    ins = [m for m in map(SASS_LINE.match, cuobjdump(cubin, "-sass").splitlines()) if m]

    def jumps(predicated: bool) -> list[tuple[int, int]]:
        return [
            (int(m[1], 16), int(m[4].split("0x")[1].split()[0].rstrip(";"), 16))
            for m in ins
            if bool(m[2]) == predicated and m[3] == "BRA" and "0x" in m[4]
        ]

    # if/else blocks: "then" a+16 .. c, else b .. d
    pairs = [
        (a, c, b, d)
        for a, b in jumps(True)
        for c, d in jumps(False)
        if a < c < b <= d and c + 16 == b
    ]
    inside = lambda lo, hi: [p for p in pairs if lo < p[0] and p[3] <= hi]  # noqa: E731
    exits = [int(m[1], 16) for m in ins if not m[2] and m[3] == "EXIT"]

    def one_tier(a: int, b: int) -> bool:  # no tier's end (an EXIT) before the body's end
        return a < b and len(inside(a, b)) <= 1 and not any(a < e < b - 4 * 16 for e in exits)

    at, to = max((j for j in jumps(True) if one_tier(*j)), key=lambda j: j[1] - j[0])
    # instructions of the longer side of the branch's if/else
    longer = sum(max(c - a, d - b) // 16 for a, c, b, d in inside(at, to))
    skipped = sum((b - a) // 16 - 1 for a, b in jumps(True) if a < b <= at)
    usage = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump(cubin, "-res-usage"))
    return {
        "registers": int(usage[1]),
        "stack_bytes": int(usage[2]),
        "sass_instructions": len(ins),
        "sass_prologue": at // 16 - skipped,
        "sass_skipped": skipped,
        "sass_int8_branch": (to - at) // 16 - longer,
    }


VARIANTS = (17, 26, *range(28, 42))  # SHAPES the sweep times


def label(tuning: channel.ChannelTuning) -> str:
    """``words+group1, 128 channels, 2 warps``: how ``tuning`` differs from the default
    launch shape (64 channels, 1 warp, narrow; ``words`` implies ``fill_rows``' rows)."""
    base = "words" if tuning.words else "fill_rows" if tuning.fill_rows else ""
    if tuning.channel_group:
        base += f"+group{tuning.channel_group}"
    extra = [f"{tuning.load_bytes}-byte loads"] if tuning.load_bytes != 16 else []
    extra += [f"{tuning.channels} channels"] if tuning.channels != 64 else []
    extra += [f"{tuning.num_warps} warps"] if tuning.num_warps != 1 else []
    return ", ".join([base or "default", *extra])


def counts(index: int) -> dict:
    """PTX and SASS counts of ``_pack_channel_kernel`` (bf16) at ``SHAPES[index]``."""
    tuning = channel.ChannelTuning(*SHAPES[index])
    channels, warps = tuning.channels, tuning.num_warps
    tables = {"src_ptrs": "*i64", "rows": "*i64", "meta": "*i64", "payload": "*u8"}
    args = {**tables, "scales": "*fp32"}
    args.update(dict.fromkeys(("b1", "n0", "n1", "num_layers", "h0"), "i32"))
    consts = dict(
        H=8, HP=8, D=128, DC=channels, KB=KB, IDX=tl.int32, HG=tuning.heads_per_program,
        HEAD_MAJOR=tuning.head_major, SRC=tl.bfloat16, NARROW=tuning.narrow,
        FILL=tuning.fill_rows, CW=tuning.channel_group, WORDS=tuning.words, PTX=True,
        WORD_ALIGN=tuning.word_align,
    )  # fmt: skip
    divisible = (*tables, "scales", "num_layers")  # b1, n0, n1, h0: do_not_specialize
    kernel = compile_for_h200(channel._pack_channel_kernel, args, consts, warps, divisible)
    body = [
        line.strip()
        for line in kernel.asm["ptx"].splitlines()
        if re.match(r"\s+[@a-z]", line) and not line.strip().startswith(".")
    ]
    sass = sass_counts(kernel.asm["cubin"])
    per_thread = KB * channels // (32 * warps)
    program = sass["sass_prologue"] + sass["sass_int8_branch"]
    warp_regs = -(-sass["registers"] // 8) * 8 * 32  # allocated in units of 256 a warp
    per_quarter = 16384 // warp_regs  # an SM's four schedulers have 16384 registers each
    return {
        "shape": index,
        "variant": label(tuning),
        "fill_rows": tuning.fill_rows,
        "channel_group": tuning.channel_group,
        "channels": channels,
        "num_warps": warps,
        "words": tuning.words,
        "load_bytes": tuning.load_bytes,
        "ptx_instructions": len(body),
        "selects": sum("selp" in x for x in body),
        "global_loads": sum("ld.global" in x for x in body),
        **sass,
        "elements_per_thread": per_thread,
        "sass_per_int8_program": program,
        "sass_per_element": round(program / per_thread, 2),
        "warps_per_sm": min(4 * per_quarter // warps * warps, 32 * warps, 64),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    rows = [counts(index) for index in VARIANTS]
    result = {"hardware": "cpu (compiled for sm_90)", "triton": triton.__version__, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"channel_ptx_triton{triton.__version__}.json").write_text(json.dumps(result, indent=1))
    print(f"Triton {triton.__version__}, sm_90, the INT8 tier's program:")
    print("| variant | registers | stack | warps/SM | SASS a program | an element | PTX selects |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['registers']} | {r['stack_bytes']} | {r['warps_per_sm']}"
            f" | {r['sass_per_int8_program']} | {r['sass_per_element']} | {r['selects']} |"
        )


if __name__ == "__main__":
    main()
