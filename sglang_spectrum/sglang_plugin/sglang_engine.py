"""The INT4 probe's engine on SGLang's own model runner (no scheduler loop).

Drives ``ModelRunner`` the way ``sglang/bench_one_batch.py`` does (``Req`` ->
``ScheduleBatch.prepare_for_extend`` -> ``get_model_worker_batch`` ->
``ForwardBatch.init_new`` -> ``model_runner.forward``, then
``prepare_for_decode`` steps), with the server's real pools and allocators but
a dummy prefix cache (the probe's prompts never enter the radix tree). One
answer:

1. extend the prompt (full precision, like the prefill server); the first
   answer token comes from these logits, as in PD serving;
2. degraded only: read the prompt's K/V from its pool slots
   (``req_to_token`` -> ``k_buffer[l]`` / ``v_buffer[l]``), ``pack_kv`` under
   the probe's 3-tier config (``allow_drop=False``, as a transfer packs:
   no queries, K-only importance) and ``unpack_kv`` back into the same slots,
   i.e. the decode server's view of the transferred KV;
3. decode greedily (argmax) up to ``max_new_tokens`` or EOS;
4. free the request's KV slots and its ``req_to_token`` row, and check that
   both pools are back to their size before the call (a leak raises).

The probe asks for the full answer of a prompt before its degraded answer, so
a full answer keeps a CPU copy of the prompt's pool KV and its first token
(the last ``memo`` prompts): the degraded answer then allocates the slots,
writes the unpacked KV straight into them and starts decoding, without a
second prefill forward (the prefill is deterministic, so this is the KV a
second extend would produce; it is also exactly what a PD decode server
receives: the prompt KV and the first token).
"""

from __future__ import annotations

import itertools
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from sglang_spectrum.codec import pack_kv, unpack_kv
from sglang_spectrum.config import SpectrumConfig

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NUMBER_DONE = re.compile(r"\d[^\d,]")  # a digit run (commas allowed) followed by a non-digit
_ids = itertools.count()


class ProbeEngineError(RuntimeError):
    """The probe cannot run on this model runner (the reason is the message)."""


class _ProbeTreeCache(SimpleNamespace):
    """Minimal prefix cache for ``ScheduleBatch`` (as ``bench_one_batch`` uses):
    allocation only, nothing cached, nothing evictable."""

    def supports_swa(self) -> bool:
        return False

    def supports_mamba(self) -> bool:
        return False

    def is_chunk_cache(self) -> bool:
        return False

    def is_tree_cache(self) -> bool:
        return True

    def evict(self, params: Any) -> None:
        pass

    def pretty_print(self) -> None:
        pass

    def available_and_evictable_str(self) -> str:
        return f"available={self.token_to_kv_pool_allocator.available_size()}"


def kv_pool_of(model_runner: Any) -> Any:
    """The MHA pool holding ``k_buffer``/``v_buffer`` (raises ProbeEngineError otherwise)."""
    pool = model_runner.token_to_kv_pool
    if hasattr(pool, "full_kv_pool"):
        raise ProbeEngineError(f"hybrid KV pool {type(pool).__name__} is not supported")
    if not (hasattr(pool, "k_buffer") and hasattr(pool, "v_buffer")):
        raise ProbeEngineError(f"KV pool {type(pool).__name__} has no k_buffer/v_buffer (MLA?)")
    dtype = pool.k_buffer[0].dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise ProbeEngineError(f"KV pool dtype {dtype} is not supported (16/32-bit float only)")
    return pool


def probe_capacity(model_runner: Any) -> int:
    """Most tokens (prompt + answer) one probe request may hold right now."""
    limits = [
        int(model_runner.token_to_kv_pool_allocator.available_size()),
        int(model_runner.req_to_token_pool.max_context_len),
        int(model_runner.model_config.context_len),
    ]
    if model_runner.req_to_token_pool.available_size() < 1:
        return 0
    page = int(getattr(model_runner.token_to_kv_pool_allocator, "page_size", 1) or 1)
    return max(0, min(limits) - page)  # one page of headroom for paged allocation


class SGLangProbeEngine:
    """``full_answer`` / ``degraded_answer`` (see :mod:`sglang_spectrum.eval.probe`)
    on an SGLang ``ModelRunner``."""

    def __init__(
        self,
        model_runner: Any,
        tokenizer: Any,
        max_new_tokens: int = 10,
        eos_token_ids: set[int] | None = None,
        memo: int = 4,
    ):
        self.mr = model_runner
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.pool = kv_pool_of(model_runner)
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = {int(eos)} if eos is not None else set()
            gen = getattr(model_runner.model_config, "hf_eos_token_id", None)
            if gen:
                eos_token_ids |= {int(t) for t in gen}
        self.eos = set(eos_token_ids)
        self.last_tier_counts: dict[str, int] | None = None
        self.forwards = 0  # model forwards run (extend or decode steps)
        self.seconds = {"extend": 0.0, "decode": 0.0, "codec": 0.0}
        self.memo_size = memo
        # prompt ids -> (per-layer K, per-layer V on CPU, first answer token)
        self._memo: OrderedDict[tuple[int, ...], tuple[list, list, int]] = OrderedDict()

    # ------------------------------------------------------------------ API

    def full_answer(self, input_ids: torch.Tensor) -> str:
        return self._answer(input_ids, None)

    def degraded_answer(self, input_ids: torch.Tensor, config: SpectrumConfig) -> str:
        # A transfer never drops tokens (DESIGN.md §8): same here.
        return self._answer(input_ids, config.with_(allow_drop=False))

    # ------------------------------------------------------------------ internals

    def _answer(self, input_ids: torch.Tensor, config: SpectrumConfig | None) -> str:
        tokens = self.generate(input_ids.tolist(), config, stop=self._number_complete)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _number_complete(self, tokens: list[int]) -> bool:
        """True once the answer holds a whole number: the probe scores the first
        number only (``niah.answer_matches``), later tokens cannot change it."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return _NUMBER_DONE.search(text) is not None

    @torch.no_grad()
    def generate(
        self,
        ids: list[int],
        config: SpectrumConfig | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        """Greedy answer token ids for the prompt ``ids`` (KV degraded by ``config``);
        stops at EOS, ``max_new_tokens`` or when ``stop(tokens)`` is true."""
        from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch
        from sglang.srt.sampling.sampling_params import SamplingParams
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        mr = self.mr
        need = len(ids) + self.max_new_tokens
        if need > probe_capacity(mr):
            raise ProbeEngineError(
                f"probe request of {need} tokens does not fit (room for {probe_capacity(mr)})"
            )
        allocator, req_pool = mr.token_to_kv_pool_allocator, mr.req_to_token_pool
        free_tokens, free_reqs = allocator.available_size(), req_pool.available_size()

        req = Req(
            rid=f"spectrum-probe-{next(_ids)}",
            origin_input_text="",
            origin_input_ids=list(ids),
            sampling_params=SamplingParams(temperature=0, max_new_tokens=self.max_new_tokens),
        )
        req.fill_ids = list(ids)
        req.logprob_start_len = -1
        req.set_extend_input_len(len(req.fill_ids))
        tree_cache = _ProbeTreeCache(
            page_size=int(getattr(allocator, "page_size", 1) or 1),
            device=mr.device,
            token_to_kv_pool_allocator=allocator,
            req_to_token_pool=req_pool,
        )
        batch = ScheduleBatch.init_new(
            reqs=[req],
            req_to_token_pool=req_pool,
            token_to_kv_pool_allocator=allocator,
            tree_cache=tree_cache,
            model_config=mr.model_config,
            enable_overlap=False,
            spec_algorithm=SpeculativeAlgorithm.NONE,
        )
        allocated = 0  # KV slots of this request (prefix of its req_to_token row)
        out: list[int] = []
        key = tuple(ids)
        memo = self._memo.get(key) if config is not None else None
        try:
            batch.prepare_for_extend()  # allocates the slots (no forward yet)
            allocated = int(batch.seq_lens_cpu[0])
            slots = req_pool.req_to_token[req.req_pool_idx, : len(ids)].to(torch.int64)
            if memo is not None:  # the prompt's full-precision KV: no second prefill
                keys, values, next_id = memo
                self._degrade(slots, keys, values, config)
            else:
                next_id = self._forward(batch, ForwardBatch)
                if config is None and self.memo_size > 0:
                    self._remember(key, slots, next_id)
                if config is not None:
                    self._degrade(slots, None, None, config)
            while True:
                out.append(next_id)
                if next_id in self.eos or len(out) >= self.max_new_tokens:
                    break
                if stop is not None and stop(out):
                    break
                batch.output_ids = torch.tensor([next_id], dtype=torch.int64, device=mr.device)
                batch.prepare_for_decode()
                allocated = int(batch.seq_lens_cpu[0])
                next_id = self._forward(batch, ForwardBatch)
        finally:
            if req.req_pool_idx is not None:
                if allocated:
                    slots = req_pool.req_to_token[req.req_pool_idx, :allocated]
                    allocator.free(slots.to(torch.int64))
                req_pool.free(req)
        after = (allocator.available_size(), req_pool.available_size())
        if after != (free_tokens, free_reqs):
            raise ProbeEngineError(
                f"probe leaked pool slots: tokens {free_tokens} -> {after[0]},"
                f" requests {free_reqs} -> {after[1]}"
            )
        return out

    def _forward(self, batch: Any, ForwardBatch: Any) -> int:
        t0 = time.perf_counter()
        worker_batch = batch.get_model_worker_batch()
        forward_batch = ForwardBatch.init_new(worker_batch, self.mr)
        logits = self.mr.forward(forward_batch).logits_output.next_token_logits
        self.forwards += 1
        token = int(logits[0].argmax())
        kind = "decode" if batch.forward_mode.is_decode() else "extend"
        self.seconds[kind] += time.perf_counter() - t0
        return token

    def _remember(self, key: tuple[int, ...], slots: torch.Tensor, first: int) -> None:
        keys = [k[slots].cpu() for k in self.pool.k_buffer]
        values = [v[slots].cpu() for v in self.pool.v_buffer]
        self._memo[key] = (keys, values, first)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)

    def _degrade(
        self,
        slots: torch.Tensor,
        keys: list[torch.Tensor] | None,
        values: list[torch.Tensor] | None,
        config: SpectrumConfig,
    ) -> None:
        """Pack the prompt's KV as a transfer would and write the result into ``slots``.

        ``keys``/``values``: the prompt's full-precision KV (default: read from
        the slots themselves, i.e. after an extend).
        """
        t0 = time.perf_counter()
        k_pools, v_pools = self.pool.k_buffer, self.pool.v_buffer
        if keys is None or values is None:
            keys = [k[slots] for k in k_pools]
            values = [v[slots] for v in v_pools]
        device = k_pools[0].device
        keys = [k.to(device) for k in keys]
        values = [v.to(device) for v in values]
        packed = pack_kv(keys, values, config)
        info = unpack_kv(packed.to_tensor(), k_pools, v_pools, slots)
        if info.dropped.numel():  # allow_drop=False: never; a dropped slot would hold stale KV
            raise ProbeEngineError(f"the codec dropped {info.dropped.numel()} prompt tokens")
        self.last_tier_counts = info.tier_counts
        self.seconds["codec"] += time.perf_counter() - t0
