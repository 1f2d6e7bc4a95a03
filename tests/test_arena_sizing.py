"""Receive-arena sizing: a decode's default arena holds the longest request it admits.

The H200 lease of 2026-12-03 (``bench/results/gpu_calls/2026-12-03-s3``) had every
16k request of a ``--spectrum-budget 0.3`` pair fail: its decode reserved
``kv_memory * b / (4 + b)`` = 1035 MiB before the KV pool was sized, and each 16k
request asked for a 1126 MB region, the bound at 2 tiers (INT8 no-drop floor, 0.52
of the 16-bit bytes) although both servers ran ``--spectrum-tiers 3``. These tests
pin the two fixes on the real sizing functions and real packed buffers: regions are
bounded at the tier mode the prefill resolved, and the reservation made before the
pool is sized covers the longest request's region.
"""

from __future__ import annotations

import types

import pytest
import torch

from sglang_spectrum.sglang_plugin.options import SpectrumServerOptions
from sglang_spectrum.sglang_plugin.transport import (
    MAX_ARENA,
    joint_arena_bytes,
    longest_receive_region,
    region_bytes,
)

MIB = 1 << 20
# Llama-3-8B on one GPU, the layout of the H200 serving runs
LLAMA3_8B = {"layers": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}


def full_bytes(layout: dict, tokens: int) -> int:
    size = getattr(torch, layout["dtype"]).itemsize
    return 2 * tokens * layout["layers"] * layout["kv_heads"] * layout["head_dim"] * size


def test_bound_codec_takes_the_resolved_tier_mode():
    auto_tiers = SpectrumServerOptions(budget=0.3)  # --spectrum-tiers auto (the probe decides)
    assert auto_tiers.bound_codec().tiers == "2"  # unknown mode: the larger floor
    assert auto_tiers.bound_codec("3").tiers == "3"  # the prefill's probe chose 3 tiers
    assert auto_tiers.bound_codec("2").tiers == "2"
    assert SpectrumServerOptions(budget=0.3, tiers="3").bound_codec().tiers == "3"
    assert SpectrumServerOptions(budget=0.3, tiers="3").bound_codec("2").tiers == "2"


def test_16k_region_at_b03_follows_the_budget_with_three_tiers():
    opts = SpectrumServerOptions(budget=0.3)
    full = full_bytes(LLAMA3_8B, 16384)
    two = region_bytes(LLAMA3_8B, 16384, opts.bound_codec("2"), chunk_tokens=8192)
    three = region_bytes(LLAMA3_8B, 16384, opts.bound_codec("3"), chunk_tokens=8192)
    assert two == 1125993984  # the region every 16k request asked for on 2026-12-03
    assert 0.30 < three / full < 0.32  # now: the budget plus headers
    assert three < 1085302679  # fits the arena those requests were refused by


@pytest.mark.parametrize("budget", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("tiers", ["3", "2"])
def test_packed_requests_fit_the_region_of_their_tier_mode(budget, tiers):
    from sglang_spectrum.transfer import pack_request

    torch.manual_seed(0)
    layout = {"layers": 3, "kv_heads": 2, "head_dim": 64, "dtype": "bfloat16"}
    k = [torch.randn(600, 2, 64).to(torch.bfloat16) for _ in range(3)]
    v = [torch.randn(600, 2, 64).to(torch.bfloat16) for _ in range(3)]
    prefill = SpectrumServerOptions(budget=budget, tiers=tiers)
    bound_cfg = prefill.bound_codec()  # what the prefill sends at (its codec, no drops)
    for n in (1, 33, 512):
        slots = torch.randperm(600)[:n]
        region = region_bytes(layout, n, SpectrumServerOptions(budget=budget).bound_codec(tiers))
        for allocator in ("paper", "optimal"):
            out = torch.empty(region, dtype=torch.uint8)
            packed = pack_request(k, v, slots, bound_cfg.with_(allocator=allocator), out=out)
            assert packed.nbytes <= region, (n, budget, tiers, allocator)


def test_joint_arena_holds_the_longest_region_up_to_half_the_kv_memory():
    kv_memory = int(1035.0 * MIB * 4.3 / 0.3)  # the failed decode's share was 1035 MiB
    assert abs(joint_arena_bytes(kv_memory, 0.3) - 1035 * MIB) < MIB
    longest = int(2146.5 * MIB)  # 32k context at the 2-tier bound
    assert joint_arena_bytes(kv_memory, 0.3, longest) == longest
    assert joint_arena_bytes(kv_memory, 1.0, longest) > longest  # the share is larger
    assert joint_arena_bytes(kv_memory, 0.3, kv_memory) == kv_memory // 2  # pool keeps half
    assert joint_arena_bytes(400 << 30, 1.0, 12 << 30) == 12 << 30 > MAX_ARENA


def test_fp8_decode_bounds_a_16bit_source_too():
    fp8 = dict(LLAMA3_8B, dtype="float8_e4m3fn")
    codec = SpectrumServerOptions(budget="auto").bound_codec()  # b = 1.0
    own = region_bytes(fp8, 4096, codec)
    widest = longest_receive_region(fp8, 4096, codec)
    # budgets count 16-bit bytes: a 16-bit source adds only its larger headers
    assert widest == region_bytes(fp8, 4096, codec, dtype="bfloat16") > own
    assert longest_receive_region(LLAMA3_8B, 4096, codec) == region_bytes(LLAMA3_8B, 4096, codec)


def test_planned_layout_from_sglang_model_config():
    """The hook reads SGLang's real ``ModelConfig`` of a real model (SmolLM2-135M)."""
    from sglang.srt.configs.model_config import ModelConfig

    from sglang_spectrum.models import ensure_model
    from sglang_spectrum.sglang_plugin import compat
    from sglang_spectrum.sglang_plugin.plugin import _longest_region

    config = ModelConfig(model_path=str(ensure_model("smollm2-135m")))
    runner = types.SimpleNamespace(  # the ModelRunner fields read before alloc_memory_pool
        model_config=config,
        kv_cache_dtype=torch.bfloat16,
        tp_size=1,
        server_args=types.SimpleNamespace(max_total_tokens=None),
    )
    layout, tokens = compat.planned_kv_layout(runner)
    assert layout == {"layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "bfloat16"}
    assert tokens == config.context_len == 8192
    runner.server_args.max_total_tokens = 4096
    assert compat.planned_kv_layout(runner)[1] == 4096
    opts = SpectrumServerOptions(budget=0.3, tiers="3")
    full = full_bytes(layout, 4096)
    longest = _longest_region(runner, kv_memory=1 << 40, opts=opts)
    assert longest >= region_bytes(layout, 4096, opts.bound_codec(), chunk_tokens=512)
    assert longest < 0.35 * full
    # a pool smaller than the context: the KV memory caps the longest request
    assert _longest_region(runner, kv_memory=full // 4, opts=opts) < longest / 3
    assert compat.planned_kv_layout(types.SimpleNamespace()) is None


def test_the_arena_option_help_states_the_sizes_the_code_uses():
    """Finding 5: ``--spectrum-arena-mb``'s help gave another range than the arena got.
    The help's numbers are the code's: pool x budget / 4, 64 MiB to 8 GiB, at least the
    send regions of SEND_DEPTH chunks on a prefill."""
    import argparse

    from sglang_spectrum.sglang_plugin.manager import SEND_DEPTH
    from sglang_spectrum.sglang_plugin.options import add_cli_args
    from sglang_spectrum.sglang_plugin.transport import MAX_ARENA, MIN_ARENA, arena_bytes

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    action = next(a for a in parser._actions if "--spectrum-arena-mb" in a.option_strings)
    text = " ".join(action.help.split())
    assert "arena = pool x budget / 4" in text
    assert f"{MIN_ARENA >> 20} MiB to {MAX_ARENA >> 30} GiB" in text
    assert f"at least {SEND_DEPTH} chunks' send buffers" in text
    gib = 1 << 30
    assert arena_bytes(0, 16 * gib, 0.5) == 2 * gib  # pool x budget / 4
    assert arena_bytes(0, 64 << 20, 0.5) == MIN_ARENA and arena_bytes(0, 400 * gib, 1) == MAX_ARENA
