"""Speculative decoding: the draft model's KV pool travels with the target's.

With EAGLE / EAGLE-3 / STANDALONE / MTP, SGLang appends the draft model's KV buffers to
``kv_args.kv_data_ptrs`` on both PD roles (``disaggregation/prefill.py`` and
``decode.py``, both versions) and the decode's draft model reads them. SpectrumKV packs
the draft's layers after the target's, at the same slots and tiers. These tests use
SGLang's real ``MHATokenToKVPool`` and ``KVArgs`` filled the way its bootstrap queue
fills them, and the real request path; serving with a draft model needs the GPU
(``bench/serving_gpu.py --phases spec``: SGLang's speculative workers need CUDA).
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from bench_modules import serving_gpu

from sglang_spectrum.config import SpectrumFormatError
from sglang_spectrum.receive import unpack_request
from sglang_spectrum.sglang_plugin import compat
from sglang_spectrum.sglang_plugin.identity import incompatibility, wire_identity
from sglang_spectrum.sglang_plugin.manager import SpectrumKVManager, pool_layout
from sglang_spectrum.sglang_plugin.options import SpectrumServerOptions
from sglang_spectrum.sglang_plugin.transport import region_bytes
from sglang_spectrum.transfer import pack_request

SLOTS = 256


def _pool(layers: int, heads: int = 3, dtype=torch.bfloat16, start_layer=None):
    """SGLang's MHA token pool on the CPU (a draft pool starts after the target's layers)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        size=SLOTS, page_size=1, dtype=dtype, head_num=heads, head_dim=64,
        layer_num=layers, device="cpu", enable_memory_saver=False,
        enable_alt_stream=False, start_layer=start_layer,
    )  # fmt: skip


def _kv_args(*pools):
    """``KVArgs.kv_data_ptrs`` as SGLang's queues fill it: each pool's contiguous buffers
    (K of every layer, then V), the target's first, then the draft's."""
    from sglang.srt.disaggregation.base.conn import KVArgs

    args = KVArgs()
    args.kv_data_ptrs = [p for pool in pools for p in pool.get_contiguous_buf_infos()[0]]
    return args


def _problem(kv_args, pool, draft=None) -> str:
    return SpectrumKVManager._unsupported(types.SimpleNamespace(kv_args=kv_args), pool, draft)


def test_a_draft_pool_of_the_targets_layout_is_packed_with_it():
    target, draft = _pool(4), _pool(1, start_layer=4)  # EAGLE: one draft layer
    assert _problem(_kv_args(target, draft), target, draft) == ""
    assert _problem(_kv_args(target), target) == ""  # no draft model (or NGRAM)


def test_buffers_registered_for_transfer_must_be_exactly_the_packed_ones():
    target, draft = _pool(4), _pool(1, start_layer=4)
    # SGLang ships a draft pool the manager was not given: its decode would read stale KV
    assert "not the pools' K and V" in _problem(_kv_args(target, draft), target)
    # a draft pool SGLang does not register is not ours to send either
    assert "not the pools' K and V" in _problem(_kv_args(target), target, draft)


def test_a_draft_of_another_kv_layout_is_refused_in_one_line():
    target, draft = _pool(4, heads=3), _pool(2, heads=1, start_layer=4)
    problem = _problem(_kv_args(target, draft), target, draft)
    assert "draft model's KV layout" in problem and "differs from the target's" in problem
    assert "\n" not in problem


def test_a_draft_over_an_fp8_kv_cache_is_refused():
    fp8 = torch.float8_e4m3fn
    target, draft = _pool(4, dtype=fp8), _pool(1, dtype=fp8, start_layer=4)
    assert _problem(_kv_args(target), target) == ""  # FP8 pools alone are served
    problem = _problem(_kv_args(target, draft), target, draft)
    assert "FP8 KV cache" in problem and "16-bit" in problem


def test_prefill_and_decode_must_agree_on_the_draft():
    target, draft = _pool(4), _pool(1, start_layer=4)
    k = list(target.k_buffer)
    with_draft = pool_layout(k + list(draft.k_buffer), 1, None, draft_layers=1)
    without = pool_layout(k, 1, None)
    peer = wire_identity(layout=with_draft, attn_tp_size=1)
    problem = incompatibility(peer, "prefill X", "decode", {"layout": without, "attn_tp_size": 1})
    assert "ships 1 speculative draft KV layers, this decode server has 0" in problem
    same = {"layout": dict(with_draft), "attn_tp_size": 1}
    assert incompatibility(peer, "prefill X", "decode", same) == ""
    # a peer from before draft layers were announced counts as none
    old = wire_identity(layout={k: v for k, v in without.items() if k != "draft_layers"})
    assert incompatibility(old, "prefill X", "decode", {"layout": without}) == ""


def test_draft_layers_for_sizing_come_from_the_draft_checkpoint(tmp_path):
    from sglang_spectrum.models import ensure_model

    smollm = str(ensure_model("smollm2-135m"))
    args = types.SimpleNamespace
    assert compat.draft_kv_layers(args(speculative_algorithm=None), 32) == 0
    assert compat.draft_kv_layers(args(speculative_algorithm="NGRAM"), 32) == 0
    standalone = args(speculative_algorithm="STANDALONE", speculative_draft_model_path=smollm)
    assert compat.draft_kv_layers(standalone, 32) == 30
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    eagle = args(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(tmp_path))
    assert compat.draft_kv_layers(eagle, 32) == 1
    missing = args(speculative_algorithm="EAGLE", speculative_draft_model_path="/nonexistent")
    assert compat.draft_kv_layers(missing, 32) == 32  # unknown: bounded by the target's

    from sglang.srt.configs.model_config import ModelConfig

    runner = types.SimpleNamespace(  # the ModelRunner fields read before alloc_memory_pool
        model_config=ModelConfig(model_path=smollm),
        kv_cache_dtype=torch.bfloat16,
        tp_size=1,
        server_args=args(max_total_tokens=None, **vars(standalone)),
    )
    layout, _ = compat.planned_kv_layout(runner)
    assert layout["layers"] == 60  # the decode's arena is planned for both models' KV


def _filled(pool, seed: int):
    g = torch.Generator().manual_seed(seed)
    for buf in [*pool.k_buffer, *pool.v_buffer]:
        buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype))
    return list(pool.k_buffer), list(pool.v_buffer)


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_draft_layers_round_trip_through_the_request_path(budget):
    """The prefill's target + draft layers land in the decode's target + draft pools:
    byte-identical at b=1.0, INT8/FP16 at b=0.5; a decode without the draft pool
    refuses the buffer and writes nothing."""
    tk, tv = _filled(_pool(4), 1)
    dk, dv = _filled(_pool(1, start_layer=4), 2)
    k, v = tk + dk, tv + dv
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(3))[:150]
    opts = SpectrumServerOptions(budget=budget, tiers="3")
    layout = pool_layout(k, 1, None, draft_layers=1)
    out = torch.empty(region_bytes(layout, len(slots), opts.bound_codec("3")), dtype=torch.uint8)
    packed = pack_request(k, v, slots, opts.bound_codec("3"), out=out)

    decode_target, decode_draft = _pool(4), _pool(1, start_layer=4)
    rk = list(decode_target.k_buffer) + list(decode_draft.k_buffer)
    rv = list(decode_target.v_buffer) + list(decode_draft.v_buffer)
    dst = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(4))[:150]
    unpack_request(out, rk, rv, dst, expected_checksum=packed.checksum)
    sent_k, got_k = dk[0][slots].float(), decode_draft.k_buffer[0][dst].float()
    sent_v, got_v = dv[0][slots].float(), decode_draft.v_buffer[0][dst].float()
    if budget == 1.0:
        assert torch.equal(got_k, sent_k) and torch.equal(got_v, sent_v)
        assert torch.equal(decode_target.k_buffer[3][dst], tk[3][slots])  # target intact
    else:
        assert packed.tier_counts["drop"] == 0
        rel = (got_k - sent_k).norm() / sent_k.norm()
        assert 0 < rel < 0.05  # INT8 tiers, not the stale zeros of an unsent draft pool

    untouched = _pool(4)
    with pytest.raises(SpectrumFormatError):
        unpack_request(
            out, list(untouched.k_buffer), list(untouched.v_buffer), dst,
            expected_checksum=packed.checksum,
        )  # fmt: skip
    assert all(not buf.any() for buf in untouched.k_buffer)


def test_the_benchmarks_eagle_head_has_the_targets_kv_layout(tmp_path):
    """bench/serving_gpu_spec.py's EAGLE head (config only, dummy weights on the GPU):
    SGLang resolves it to its EAGLE model with one decoder layer whose KV heads and
    head_dim are the target's, so ``attach`` packs its pool with the target's."""
    from sglang.srt.configs.model_config import ModelConfig

    from sglang_spectrum.models import ensure_model

    bench = serving_gpu("serving_gpu_spec")
    smollm = str(ensure_model("smollm2-135m"))
    flags = bench.spec_flags(smollm, "EAGLE", tmp_path)
    head = flags[flags.index("--speculative-draft-model-path") + 1]
    assert flags[flags.index("--speculative-draft-load-format") + 1] == "dummy"
    draft, target = ModelConfig(model_path=head, is_draft_model=True), ModelConfig(smollm)
    assert draft.hf_config.architectures == ["LlamaForCausalLMEagle"]
    assert draft.num_hidden_layers == 1
    assert (draft.get_num_kv_heads(1), draft.head_dim) == (
        target.get_num_kv_heads(1),
        target.head_dim,
    )
    args = types.SimpleNamespace(speculative_algorithm="EAGLE", speculative_draft_model_path=head)
    assert compat.draft_kv_layers(args, 30) == 1
