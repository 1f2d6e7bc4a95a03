"""Head slicing of heterogeneous attention TP (``sglang_spectrum.heads``) against SGLang's own
mapping (``_resolve_rank_mapping`` and ``compute_head_slice_params`` of the mooncake backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sglang_spectrum.config import SpectrumConfigError
from sglang_spectrum.heads import (
    HeadSlice,
    decode_slices,
    heads_per_rank,
    prefill_slices,
    rank_heads,
    source_ranks,
)

# (kv_heads, prefill TP, decode TP): p < d, p > d, p == d, kv_heads < TP on either side
TABLE = [
    (8, 1, 1),
    (8, 2, 2),
    (8, 1, 2),
    (8, 2, 1),
    (8, 2, 4),
    (8, 4, 2),
    (8, 1, 8),
    (8, 8, 1),
    (16, 4, 8),
    (4, 1, 8),
    (4, 8, 1),
    (4, 8, 2),
    (4, 2, 8),
    (2, 1, 4),
    (2, 4, 1),
    (2, 2, 4),
    (2, 4, 2),
    (2, 4, 8),
    (2, 8, 4),
    (1, 1, 2),
    (1, 2, 4),
    (1, 4, 2),
    (1, 4, 1),
]


_SGLANG = """
import json, sys
from types import SimpleNamespace
from sglang.srt.disaggregation.common.conn import CommonKVManager
from sglang.srt.disaggregation.common.staging_buffer import compute_head_slice_params
out = {}
for kv_heads, p, d in json.loads(sys.argv[1]):
    pairs = out[f"{kv_heads}-{p}-{d}"] = []
    for r in range(d):
        me = SimpleNamespace(
            is_mla_backend=False, is_hybrid_mla_backend=False, attn_tp_size=d,
            kv_args=SimpleNamespace(engine_rank=r), attn_cp_size=1, attn_cp_rank=0,
            pp_size=1, pp_rank=0, enable_all_cp_ranks_for_transfer=False,
        )
        info = SimpleNamespace(
            attn_tp_size=p, attn_cp_size=1, pp_size=1, enable_kv_cache_sharding=False,
            enable_dsa_cache_layer_split=False,
        )
        CommonKVManager._resolve_rank_mapping(me, info)
        for q in info.target_tp_ranks:
            pairs.append([q, r, *compute_head_slice_params(p, d, q, r, kv_heads)])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sglang_table() -> dict[str, dict[tuple[int, int], tuple]]:
    """SGLang's transfers for every TABLE row: ``{(prefill rank, decode rank): (src_start,
    n, dst_start, n)}`` of every pair its decode ranks pull from (replicas included).

    Run in an isolated interpreter (``-I``: no PYTHONPATH, as the installed package sees
    SGLang; the repo's ``kernels/`` folder on the path would shadow a ``kernels`` module
    that transformers probes for)."""
    pytest.importorskip("sglang")
    res = subprocess.run(
        [sys.executable, "-I", "-c", _SGLANG, json.dumps(TABLE)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if res.returncode:
        pytest.fail(f"SGLang's mapping did not run: {res.stderr[-2000:]}")
    raw = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: {(q, r): tuple(rest) for q, r, *rest in v} for k, v in raw.items()}


@pytest.mark.parametrize("kv_heads,p,d", TABLE, ids=lambda x: str(x))
def test_mapping_is_sglangs(sglang_table, kv_heads, p, d):
    """Every slice is SGLang's pair with SGLang's ranges; SGLang pairs left out are
    replicas writing heads another listed slice already writes."""
    pairs = sglang_table[f"{kv_heads}-{p}-{d}"]
    ours = [s for r in range(d) for s in decode_slices(kv_heads, p, d, r)]
    for s in ours:
        src0, n, dst0, n2 = pairs[(s.prefill_rank, s.decode_rank)]
        assert s.src == (src0, src0 + n) and s.dst == (dst0, dst0 + n2), s
    listed = {(s.prefill_rank, s.decode_rank) for s in ours}
    for (q, r), (_, n, dst0, _) in pairs.items():
        if (q, r) in listed:
            continue
        assert p > d and kv_heads < p, "only prefill replicas are left out"
        twin = [s for s in ours if s.decode_rank == r and s.dst == (dst0, dst0 + n)]
        assert len(twin) == 1
        assert rank_heads(kv_heads, p, twin[0].prefill_rank) == rank_heads(kv_heads, p, q)
    assert {q for q, _ in pairs} == set(range(p)) and {r for _, r in pairs} == set(range(d))
    for r in range(d):
        assert [q for q, rr in pairs if rr == r] == source_ranks(p, d, r)


@pytest.mark.parametrize("kv_heads,p,d", TABLE, ids=lambda x: str(x))
def test_every_decode_head_once_with_the_right_global_head(kv_heads, p, d):
    """Each decode pool's heads are written exactly once, each from a prefill pool head
    holding the same global KV head; prefill_slices is decode_slices seen from the sender."""
    hp, hd = heads_per_rank(kv_heads, p), heads_per_rank(kv_heads, d)
    for r in range(d):
        written = []
        g_dst = rank_heads(kv_heads, d, r)[0]
        for s in decode_slices(kv_heads, p, d, r):
            assert isinstance(s, HeadSlice) and s.num_heads == s.dst[1] - s.dst[0] >= 1
            assert 0 <= s.src[0] < s.src[1] <= hp and 0 <= s.dst[0] < s.dst[1] <= hd
            g_src = rank_heads(kv_heads, p, s.prefill_rank)[0]
            for i in range(s.num_heads):  # global head of each moved head, on both sides
                src_global = g_src + s.src[0] + i if kv_heads >= p else g_src
                dst_global = g_dst + s.dst[0] + i if kv_heads >= d else g_dst
                assert src_global == dst_global, (s, i)
            written += range(*s.dst)
        assert sorted(written) == list(range(hd)), (r, written)
    for q in range(p):
        want = [
            s for r in range(d) for s in decode_slices(kv_heads, p, d, r) if s.prefill_rank == q
        ]
        assert prefill_slices(kv_heads, p, q, d) == want
    senders = sum(bool(prefill_slices(kv_heads, p, q, d)) for q in range(p))
    assert senders == (p if p <= d or kv_heads >= p else max(kv_heads, d))


def test_examples_and_refusals():
    # p=1 -> d=2, 8 heads: rank 0 sends heads 0-3 to decode 0 and 4-7 to decode 1
    assert prefill_slices(8, 1, 0, 2) == [
        HeadSlice(0, 0, (0, 4), (0, 4)),
        HeadSlice(0, 1, (4, 8), (0, 4)),
    ]
    # p=2 -> d=1: decode 0 gets prefill 0 into heads 0-3, prefill 1 into heads 4-7
    assert decode_slices(8, 2, 1, 0) == [
        HeadSlice(0, 0, (0, 4), (0, 4)),
        HeadSlice(1, 0, (0, 4), (4, 8)),
    ]
    # 2 heads, p=4 -> d=1: ranks 0/1 and 2/3 are replicas; 0 and 2 send
    assert decode_slices(2, 4, 1, 0) == [
        HeadSlice(0, 0, (0, 1), (0, 1)),
        HeadSlice(2, 0, (0, 1), (1, 2)),
    ]
    assert prefill_slices(2, 4, 1, 1) == [] and prefill_slices(2, 4, 3, 1) == []
    # 2 heads, p=1 -> d=4: decode replicas 0/1 get head 0, 2/3 head 1
    assert [s.src for s in prefill_slices(2, 1, 0, 4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    for bad in ((3, 2, 1), (8, 2, 3), (0, 1, 1), (8, 0, 1)):
        with pytest.raises(SpectrumConfigError):
            decode_slices(*bad, 0)
    with pytest.raises(SpectrumConfigError, match="out of range"):
        prefill_slices(8, 2, 2, 1)
    with pytest.raises(SpectrumConfigError, match="out of range"):
        decode_slices(8, 2, 1, 1)
