"""bench/serving_gpu_configs.py: the ``--configs`` grammar of the GPU serving benchmark
(what each config gives its prefill and decode servers), and its one-line refusals."""

from __future__ import annotations

import pytest
from bench_modules import serving_gpu

configs = serving_gpu("serving_gpu_configs")


def test_layer_group_and_unpack_modifiers_reach_their_server():
    c = configs.parse_config("spectrum:0.5+lg8+sent@tcp")
    assert (c.budget, c.layer_group, c.unpack_at_sent, c.link) == (0.5, 8, True, "tcp")
    assert c.name == "spectrum:0.5+lg8+sent@tcp" and c.tag == "spectrum-b0.5-lg8-sent-tcp"
    assert configs.parse_config(c.name) == c  # the name parses back to the same config
    prefill, decode = c.flags("prefill"), c.flags("decode")
    assert prefill[prefill.index("--spectrum-layer-group") + 1] == "8"
    assert "--spectrum-unpack" not in prefill and "--spectrum-layer-group" not in decode
    assert decode[decode.index("--spectrum-unpack") + 1] == "sent"
    # either order; the default (no +sent) leaves the decode's default (arrival)
    assert configs.parse_config("spectrum:0.5+sent+lg8@tcp") == c
    plain = configs.parse_config("spectrum:auto+lg4@nvlink")
    assert not plain.unpack_at_sent and "--spectrum-unpack" not in plain.flags("decode")
    assert plain.min_budget == 0.3 and plain.env()["MC_INTRANODE_NVLINK"] == "true"


@pytest.mark.parametrize(
    "text, message",
    [
        ("spectrum:0.5+lg0", "+lg0: the modifiers are +lgN (N > 0) and +sent, once"),
        ("spectrum:0.5+sent+sent", "+sent: the modifiers are"),
        ("spectrum:0.5+fast", "+fast: the modifiers are"),
        ("mooncake+sent@tcp", "mooncake takes no budget, key scales or modifiers"),
        ("spectrum:1.5", "budget must be in (0, 1] or auto"),
        ("spectrum:0.5@ib", "link must be tcp, nvlink or tcpslice=N"),
    ],
)
def test_bad_configs_are_refused_in_one_line(text, message):
    with pytest.raises(ValueError) as exc:
        configs.parse_config(text)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_start_holds_the_pairs_the_gpu_memory_fits():
    # one GPU holds both servers of a pair: the H200 two pairs, an 80 GiB H100 one
    assert configs.pairs_that_fit(139.8, split=False) == 2
    assert configs.pairs_that_fit(79.6, split=False) == 1
    # two GPUs (prefill on one, decode on the other): one server of each pair a GPU
    assert configs.pairs_that_fit(79.6, split=True) == 2
    # a card too small for even one pair still tries one (SGLang says why it fails)
    assert configs.pairs_that_fit(24.0, split=False) == 1
    assert configs.pairs_that_fit(None, split=False) is None  # unknown: no cap
    pairs = [
        configs.parse_config(c) for c in ("mooncake@tcp", "spectrum:0.5@tcp", "spectrum:auto@tcp")
    ]
    assert configs.groups(pairs, configs.pairs_that_fit(79.6, split=False)) == [[p] for p in pairs]


def test_a_group_start_is_planned_from_the_warm_starts_after_the_first():
    est = configs.Estimates({}, num_prompts=200, cpu=False, per_point_s=5.0)
    assert est.start() == 100.0  # nothing seen yet: the GPU guess
    est.add_startup(206.0)  # the machine's first start compiles its caches
    assert est.start() == 206.0
    est.add_startup(75.0)
    est.add_startup(77.0)
    assert est.start() == 1.25 * 77.0
    # a C=4 point seen at 65 s: the group of one pair now fits what a call had left (270 s)
    cfg = configs.parse_config("spectrum:0.3+lg8@tcp")
    est.add_point(cfg, 4096, 4, 65.0)
    assert est.group({cfg: [(4096, 4)]}) < 270
