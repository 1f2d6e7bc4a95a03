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
