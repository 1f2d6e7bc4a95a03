"""bench/ modules for the tests, loaded the way bench/serving_gpu.py loads its siblings:
by path, registered under their names (they import each other by name), bench/ kept off
sys.path (its kernels.py would shadow the ``kernels`` package transformers probes for)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def serving_gpu(name: str = "serving_gpu"):
    """``bench/serving_gpu.py`` (which loads every sibling it uses), or the sibling
    ``name`` it loaded (``serving_gpu_configs``, ``serving_gpu_records``, ...)."""
    if "serving_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("serving_gpu", BENCH / "serving_gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["serving_gpu"] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def bench_script(name: str):
    """``bench/<name>.py`` loaded by path as module ``name`` (once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
