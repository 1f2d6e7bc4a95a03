"""Helpers shared by the test modules (``from conftest import ...``); no fixtures."""

from __future__ import annotations

import importlib
import os
import sys

import torch

CUDA = torch.cuda.is_available()


def import_kernels():
    """``sglang_spectrum.kernels``: compiled with CUDA, else under Triton's CPU
    interpreter (``triton.jit`` reads ``TRITON_INTERPRET`` at decoration time: the
    modules are imported afresh with it set, and the variable is restored right after)."""
    if CUDA:
        return importlib.import_module("sglang_spectrum.kernels")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in [m for m in sys.modules if m.startswith("sglang_spectrum.kernels")]:
            del sys.modules[name]  # a compiled-mode copy cannot run here anyway
        return importlib.import_module("sglang_spectrum.kernels")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def emulate_zero_minus_x(monkeypatch, triton) -> str | None:
    """Make the interpreter lower float ``-x`` as ``0.0 - x``, as Triton releases without
    triton-lang/triton#10270 (May 2026; the H200 run's 3.6) compile it (``-(+0.0)`` is
    then +0.0). ``triton``: the package as the kernels imported it. Returns why it cannot
    (CUDA: compiled kernels are cached; a Triton without ``TritonSemantic.minus``), else
    None."""
    if CUDA:
        return "emulates an older Triton's -x in the interpreter (CPU only)"
    sem = getattr(triton.language.semantic, "TritonSemantic", None)
    if sem is None or not hasattr(sem, "minus"):
        return "this Triton has no TritonSemantic.minus to patch"
    own = sem.minus

    def minus(self, x):
        ty = x.type.scalar
        if not ty.is_floating():
            return own(self, x)
        zero = self.make_tensor(self.builder.get_null_value(ty.to_ir(self.builder)), ty)
        return self.sub(zero, x, True)

    monkeypatch.setattr(sem, "minus", minus)
    return None


def paged_slots(
    tokens: int, page: int, spare_pages: int, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Slots of ``tokens`` positions in shuffled pages of ``page`` slots, drawn from
    ``pages + spare_pages`` pages; (slots int64 ``[tokens]`` on CPU, pool size in slots)."""
    pages = -(-tokens // page)
    perm = torch.randperm(pages + spare_pages, generator=gen)[:pages]
    slots = (perm[:, None] * page + torch.arange(page)).reshape(-1)[:tokens]
    return slots, (pages + spare_pages) * page


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
