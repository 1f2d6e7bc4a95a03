"""The INT4 probe's engine on SGLang's own model runner (no scheduler loop).

Drives ``ModelRunner`` the way ``sglang/benchmark/one_batch.py`` does
(``Req`` -> ``ScheduleBatch.init_new`` -> ``prepare_for_extend`` ->
``ForwardBatch.init_new(batch, model_runner)`` -> ``model_runner.forward``,
then ``prepare_for_decode`` steps), with the server's real pools and
allocators but a dummy prefix cache (the probe's prompts never enter the radix
tree). One answer:

1. extend the prompt (full precision, like the prefill server); the first
   answer token comes from these logits, as in PD serving;
2. degraded only: pack the prompt's pool KV with
   :func:`sglang_spectrum.transfer.pack_request` under the probe's 3-tier
   config (``allow_drop=False``, no queries: exactly what a transfer sends) and
   :func:`~sglang_spectrum.transfer.unpack_request` it back into the same
   slots, i.e. the decode server's view of the transferred KV;
3. decode greedily (argmax) up to ``max_new_tokens`` or EOS;
4. free the request's KV slots and its ``req_to_token`` row, and check that
   both pools are back to their size before the call (a leak raises).

The probe asks for the full answer of a prompt before its degraded answer, so
a full answer keeps a CPU copy of the prompt's pool KV and its first token
(the last ``memo`` prompts): the degraded answer then allocates the slots,
writes the full-precision KV back into them, packs and unpacks it there and
starts decoding, without a second prefill forward (the prefill is
deterministic, so this is the KV a second extend would produce; it is also
exactly what a PD decode server receives: the prompt KV and the first token).

Every SGLang object the probe touches is reached through one of the small helpers in
the first section below (file:line of each release in their docstrings); what differs
between the supported releases (0.5.17 and 0.5.23) is read through :mod:`.compat`
(``needs_mlp_sync``, ``req_pool_idx``, ``extend_whole_prompt``). The rest of the module
only calls them.
"""

from __future__ import annotations

import itertools
import re
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from sglang_spectrum.config import SpectrumConfig

from .compat import extend_whole_prompt, needs_mlp_sync, req_pool_idx

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NUMBER_DONE = re.compile(r"\d[^\d,]")  # a digit run (commas allowed) followed by a non-digit
_ids = itertools.count()


class ProbeEngineError(RuntimeError):
    """The probe cannot run on this model runner (the reason is the message)."""


# =========================================================================== SGLang access
# One helper per SGLang object the probe touches. Where 0.5.17 and 0.5.23
# differ, the helper says how (file:line of each release in the docstring).


def model_runner_of(scheduler: Any) -> Any:
    """The scheduler's ``ModelRunner`` (:func:`.compat.model_runner`)."""
    from .compat import model_runner

    return model_runner(scheduler)


def kv_pool_of(model_runner: Any) -> Any:
    """The MHA token pool holding per-layer ``k_buffer``/``v_buffer`` ``[slots, heads, dim]``
    (``model_runner.token_to_kv_pool``: 0.5.17 model_runner.py:781, 0.5.23
    model_runner.py:988); anything else raises :class:`ProbeEngineError`.

    Refused: hybrid/SWA pools (``full_kv_pool``), MLA (no ``v_buffer``), 0.5.23's
    HND / vectorized-5D layouts (``kv_cache_layout`` != "nhd",
    mem_cache/memory_pool.py:2252-2280), FP8/FP4 storage. K and V sharing one
    allocation (0.5.23 memory_pool.py:2644) is fine: they are separate views.
    """
    pool = getattr(model_runner, "token_to_kv_pool", None)
    if pool is None:
        raise ProbeEngineError("the model runner has no token_to_kv_pool")
    if hasattr(pool, "full_kv_pool"):
        raise ProbeEngineError(f"hybrid KV pool {type(pool).__name__} is not supported")
    if not (getattr(pool, "k_buffer", None) and getattr(pool, "v_buffer", None)):
        raise ProbeEngineError(f"KV pool {type(pool).__name__} has no k_buffer/v_buffer (MLA?)")
    layout = getattr(pool, "kv_cache_layout", "nhd")  # 0.5.17 pools have only NHD
    if layout != "nhd" or getattr(pool, "use_hnd", False):
        raise ProbeEngineError(f"KV pool layout {layout!r} is not supported (NHD only)")
    k0 = pool.k_buffer[0]
    if k0.dim() != 3 or pool.v_buffer[0].dim() != 3:
        raise ProbeEngineError(f"KV buffers of shape {tuple(k0.shape)} are not [slots, heads, dim]")
    if k0.dtype not in _SUPPORTED_DTYPES:
        raise ProbeEngineError(f"KV pool dtype {k0.dtype} is not supported (16/32-bit float only)")
    return pool


def kv_dtype_name(model_runner: Any) -> str:
    """``bfloat16`` / ``float16`` / ``float32``: the pool's storage dtype."""
    return str(kv_pool_of(model_runner).k_buffer[0].dtype).removeprefix("torch.")


def token_allocator_of(model_runner: Any) -> Any:
    """``model_runner.token_to_kv_pool_allocator`` (0.5.17 model_runner.py:782, 0.5.23
    model_runner.py:989); ``available_size()``, ``free(indices)``, ``page_size``."""
    return model_runner.token_to_kv_pool_allocator


def req_to_token_pool_of(model_runner: Any) -> Any:
    """``model_runner.req_to_token_pool`` (0.5.17 model_runner.py:780, 0.5.23
    model_runner.py:987): ``req_to_token[row, pos]`` -> KV slot, ``free(req)``."""
    return model_runner.req_to_token_pool


def page_size_of(model_runner: Any) -> int:
    """The allocator's page (one_batch.py reads ``get_schedule().page_size`` in 0.5.23,
    :500, ``server_args.page_size`` in 0.5.17, :485; the allocator's own ``page_size``,
    mem_cache/allocator/token.py, is the same number in both)."""
    return int(getattr(token_allocator_of(model_runner), "page_size", 1) or 1)


def model_path_of(model_runner: Any) -> str:
    """The served weights' folder: ``model_runner.model_config.model_path`` (0.5.17
    configs/model_config.py:272, 0.5.23 configs/model_config.py:593)."""
    return str(model_runner.model_config.model_path)


def tokenizer_of(scheduler: Any, model_runner: Any) -> Any:
    """The scheduler's tokenizer (``scheduler.tokenizer``, set by
    ``Scheduler.init_tokenizer``: managers/scheduler.py, 0.5.17 :790, 0.5.23 :891), else the model
    folder's (``--skip-tokenizer-init`` servers)."""
    tok = getattr(scheduler, "tokenizer", None)
    if tok is not None and callable(tok) and hasattr(tok, "decode"):
        return tok
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path_of(model_runner))


def new_probe_req(ids: list[int], max_new_tokens: int) -> Any:
    """A greedy ``Req`` over the whole prompt (no prefix), as
    ``prepare_synthetic_inputs_for_latency_test`` builds it.

    The extend range differs between releases (:func:`.compat.extend_whole_prompt`). Both
    (``Req``: 0.5.17 managers/schedule_batch.py:771, 0.5.23 :1033):
    ``origin_input_ids`` an ``array('q')`` aliased by ``full_untruncated_fill_ids``.
    """
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    origin = array("q", ids)
    req = Req(
        rid=f"spectrum-probe-{next(_ids)}",
        origin_input_text="",
        origin_input_ids=origin,
        sampling_params=SamplingParams(temperature=0, max_new_tokens=int(max_new_tokens)),
    )
    req.full_untruncated_fill_ids = req.origin_input_ids
    req.logprob_start_len = -1
    extend_whole_prompt(req, len(origin))
    return req


class _ProbeTreeCache(SimpleNamespace):
    """Minimal prefix cache for ``ScheduleBatch``: allocation only, nothing cached,
    nothing evictable. The union of one_batch's ``TreeCacheNamespace`` in 0.5.17
    (benchmark/one_batch.py:464: ``is_chunk_cache``/``is_tree_cache``) and 0.5.23
    (benchmark/one_batch.py:479: ``supports_prefix_sharing``/``maybe_hand_to_session``)."""

    def supports_swa(self) -> bool:
        return False

    def supports_mamba(self) -> bool:
        return False

    def supports_prefix_sharing(self) -> bool:
        return True

    def is_chunk_cache(self) -> bool:
        return False

    def is_tree_cache(self) -> bool:
        return True

    def evict(self, params: Any) -> None:
        pass

    def maybe_hand_to_session(self, req: Any) -> None:
        pass

    def pretty_print(self) -> None:
        pass

    def available_and_evictable_str(self) -> str:
        return f"available={self.token_to_kv_pool_allocator.available_size()}"


def new_schedule_batch(req: Any, model_runner: Any) -> Any:
    """``ScheduleBatch.init_new`` for one request with a dummy tree cache (same keywords
    in both: 0.5.17 managers/schedule_batch.py:2102, called as in one_batch.py:490;
    0.5.23 schedule_batch.py:2673, one_batch.py:505). ``prepare_for_extend`` then
    allocates the row and the slots (0.5.17 schedule_batch.py:2281, 0.5.23 :2847)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    allocator, req_pool = token_allocator_of(model_runner), req_to_token_pool_of(model_runner)
    tree_cache = _ProbeTreeCache(
        page_size=page_size_of(model_runner),
        device=model_runner.device,
        token_to_kv_pool_allocator=allocator,
        req_to_token_pool=req_pool,
    )
    return ScheduleBatch.init_new(
        reqs=[req],
        req_to_token_pool=req_pool,
        token_to_kv_pool_allocator=allocator,
        tree_cache=tree_cache,
        model_config=model_runner.model_config,
        enable_overlap=False,
        spec_algorithm=SpeculativeAlgorithm.NONE,
    )


def forward_logits(batch: Any, model_runner: Any) -> torch.Tensor:
    """One forward of a prepared batch; the next-token logits ``[bs, vocab]``.

    ``get_model_worker_batch`` is gone in both releases: ``ForwardBatch.init_new``
    takes the ``ScheduleBatch`` itself (keyword ``return_hidden_states_before_norm``
    required; model_executor/forward_batch_info.py: 0.5.17 :706, 0.5.23 :958), then
    ``model_runner.forward`` (model_runner.py: 0.5.17 :1382, 0.5.23 :1813). An extend
    leaves its token ids on the host in ``prefill_input_ids_cpu``; they are moved to
    ``input_ids`` first, as one_batch.py does (0.5.17 :505, 0.5.23 :520).
    """
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
        batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
        batch.prefill_input_ids_cpu = None
    forward_batch = ForwardBatch.init_new(
        batch, model_runner, return_hidden_states_before_norm=False
    )
    return model_runner.forward(forward_batch).logits_output.next_token_logits


def prepare_decode_step(batch: Any, token_id: int) -> None:
    """Feed the last token and allocate one slot: ``batch.input_ids`` then
    ``prepare_for_decode()`` (one_batch.py: 0.5.17 :522, 0.5.23 :537;
    schedule_batch.py: 0.5.17 :2949, 0.5.23 :3736)."""
    batch.input_ids = torch.tensor([token_id], dtype=torch.int64, device=batch.device)
    batch.prepare_for_decode()


def release_req(req: Any, model_runner: Any, allocated: int) -> None:
    """Give back the request's first ``allocated`` KV slots and its ``req_to_token``
    row (the server's ``release_kv_cache`` would insert them into the radix tree).
    ``req_to_token_pool.free(req)``: mem_cache/memory_pool.py, 0.5.17 :319, 0.5.23
    :462 (clears ``req.kv.req_pool_idx``); ``token_to_kv_pool_allocator.free(slots)``:
    mem_cache/allocator/token.py, 0.5.17 :66, 0.5.23 :65."""
    row = req_pool_idx(req)
    if row is None:
        return
    req_pool = req_to_token_pool_of(model_runner)
    if allocated:
        slots = req_pool.req_to_token[row, :allocated].to(torch.int64)
        token_allocator_of(model_runner).free(slots)
    req_pool.free(req)
    kv = getattr(req, "kv", None)
    if kv is not None and hasattr(kv, "mark_kv_released"):  # 0.5.23 bookkeeping
        kv.mark_kv_released()


# =========================================================================== the engine


def probe_capacity(model_runner: Any) -> int:
    """Most tokens (prompt + answer) one probe request may hold right now."""
    allocator, req_pool = token_allocator_of(model_runner), req_to_token_pool_of(model_runner)
    if req_pool.available_size() < 1:
        return 0
    limits = [
        int(allocator.available_size()),
        int(req_pool.max_context_len),
        int(model_runner.model_config.context_len),
    ]
    return max(0, min(limits) - page_size_of(model_runner))  # a page of headroom


def pack_unpack(
    k_pools: list[torch.Tensor],
    v_pools: list[torch.Tensor],
    slots: torch.Tensor,
    config: SpectrumConfig,
    fp8: Any = None,
) -> dict[str, int]:
    """Send the KV in ``slots`` through the serving request path and back: pack it with
    :func:`sglang_spectrum.transfer.pack_request` into a send region of
    :func:`~sglang_spectrum.transfer.packed_size_bound` bytes, then
    :func:`~sglang_spectrum.transfer.unpack_request` it (checksum verified) into the
    same slots (``fp8``: the pools' :class:`~sglang_spectrum.fp8.FP8Pool`, or None).
    Returns the tier counts."""
    from sglang_spectrum.transfer import pack_request, packed_size_bound, unpack_request

    ref = k_pools[0]
    dtype = fp8.dtype if fp8 is not None else ref.dtype
    bound = packed_size_bound(
        int(slots.numel()), len(k_pools), int(ref.shape[1]), int(ref.shape[2]), dtype, config
    )
    region = torch.empty(bound, dtype=torch.uint8, device=ref.device)
    sent = pack_request(k_pools, v_pools, slots, config, out=region, fp8=fp8)
    info = unpack_request(
        region[: sent.nbytes], k_pools, v_pools, slots, expected_checksum=sent.checksum, fp8=fp8
    )
    if info.dropped.numel():  # allow_drop=False: never; a dropped slot would hold stale KV
        raise ProbeEngineError(f"the codec dropped {info.dropped.numel()} prompt tokens")
    return dict(info.tier_counts)


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
        if needs_mlp_sync(model_runner):
            raise ProbeEngineError("DP attention (MLP sync) is not supported by the probe")
        self.mr = model_runner
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.pool = kv_pool_of(model_runner)
        from .compat import fp8_pool

        self.fp8 = fp8_pool(self.pool, model_runner)
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
        # A transfer never drops tokens (options.check_no_drop): same here.
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
        mr = self.mr
        need = len(ids) + self.max_new_tokens
        if need > probe_capacity(mr):
            raise ProbeEngineError(
                f"probe request of {need} tokens does not fit (room for {probe_capacity(mr)})"
            )
        allocator, req_pool = token_allocator_of(mr), req_to_token_pool_of(mr)
        free_tokens, free_reqs = allocator.available_size(), req_pool.available_size()

        req = new_probe_req(ids, self.max_new_tokens)
        batch = new_schedule_batch(req, mr)
        allocated = 0  # KV slots of this request (prefix of its req_to_token row)
        out: list[int] = []
        key = tuple(ids)
        memo = self._memo.get(key) if config is not None else None
        try:
            batch.prepare_for_extend()  # allocates the slots (no forward yet)
            allocated = int(batch.seq_lens_cpu[0])
            slots = req_pool.req_to_token[req_pool_idx(req), : len(ids)].to(torch.int64)
            if memo is not None:  # the prompt's full-precision KV: no second prefill
                keys, values, next_id = memo
                for pool, src in zip(self.pool.k_buffer, keys):
                    pool[slots] = src.to(pool.device)
                for pool, src in zip(self.pool.v_buffer, values):
                    pool[slots] = src.to(pool.device)
                self._degrade(slots, config)
            else:
                next_id = self._forward(batch, "extend")
                if config is None and self.memo_size > 0:
                    self._remember(key, slots, next_id)
                if config is not None:
                    self._degrade(slots, config)
            while True:
                out.append(next_id)
                if next_id in self.eos or len(out) >= self.max_new_tokens:
                    break
                if stop is not None and stop(out):
                    break
                prepare_decode_step(batch, next_id)
                allocated = int(batch.seq_lens_cpu[0])
                next_id = self._forward(batch, "decode")
        finally:
            release_req(req, mr, allocated)
        after = (allocator.available_size(), req_pool.available_size())
        if after != (free_tokens, free_reqs):
            raise ProbeEngineError(
                f"probe leaked pool slots: tokens {free_tokens} -> {after[0]},"
                f" requests {free_reqs} -> {after[1]}"
            )
        return out

    def _forward(self, batch: Any, kind: str) -> int:
        t0 = time.perf_counter()
        logits = forward_logits(batch, self.mr)
        self.forwards += 1
        token = int(logits[0].argmax())
        self.seconds[kind] += time.perf_counter() - t0
        return token

    def _remember(self, key: tuple[int, ...], slots: torch.Tensor, first: int) -> None:
        keys = [k[slots].cpu() for k in self.pool.k_buffer]
        values = [v[slots].cpu() for v in self.pool.v_buffer]
        self._memo[key] = (keys, values, first)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)

    def _degrade(self, slots: torch.Tensor, config: SpectrumConfig) -> None:
        """Pack the prompt's KV in ``slots`` as a transfer would, unpack it back there."""
        t0 = time.perf_counter()
        self.last_tier_counts = pack_unpack(
            self.pool.k_buffer, self.pool.v_buffer, slots, config, self.fp8
        )
        self.seconds["codec"] += time.perf_counter() - t0
