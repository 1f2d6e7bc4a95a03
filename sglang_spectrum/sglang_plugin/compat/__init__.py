"""Every difference between the SGLang versions the backend supports, in one package.

Supported: SGLang 0.5.17 (the newest release on torch 2.11) and 0.5.23 (the
current release). The backend itself (:mod:`.manager`, :mod:`.endpoints` and the
prefill/decode sides) is written against the
``disaggregation/base`` and ``disaggregation/common`` contracts that both
versions share; what differs between them, and the few scheduler objects the
plugin reads because no contract exposes them, is reached through the
functions below (:mod:`.version`: the supported releases; :mod:`.lifecycle`: the
``Common*`` lifecycle 0.5.17 lacks). Each names the SGLang file and line it depends
on per version (``srt/`` omitted).

* Sender/receiver constructors are called with keyword arguments that differ
  (0.5.17 passes ``dest_tp_ranks`` and ``pp_rank`` to the sender): the backend
  forwards ``**kwargs`` to the ``Common*`` constructors untouched.
* ``CommonKVSender.send``/``poll``/``failure_exception`` are stubs in 0.5.17 and
  the lifecycle the backend builds on in 0.5.23 (``send`` -> the manager's
  ``add_transfer_request``): :class:`SenderLifecycle` gives 0.5.17 the 0.5.23 ones.
  Likewise ``CommonKVReceiver._register_kv_args``/``send_metadata`` (-> the
  manager's ``build_receiver_registration_message``/``build_receiver_metadata_message``)
  and ``failure_exception``: :class:`ReceiverLifecycle`. The receiver's
  ``poll``/``abort``/``clear`` are the backend's own (its receive region outlives
  SGLang's view of the request).
* 0.5.23's receiver ``send_metadata`` takes ``destination`` and
  ``device_kv_indices`` besides 0.5.17's ``decode_prefix_len``: the backend
  accepts both and refuses host destinations.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

# re-exported (``compat.X`` for every version difference)
from .lifecycle import ReceiverLifecycle as ReceiverLifecycle
from .lifecycle import SenderLifecycle as SenderLifecycle
from .version import SUPPORTED_VERSIONS as SUPPORTED_VERSIONS
from .version import UnsupportedSGLangError as UnsupportedSGLangError
from .version import check_sglang_version as check_sglang_version
from .version import sglang_version as sglang_version


def model_runner(scheduler: Any) -> Any:
    """The scheduler's ``ModelRunner``: ``scheduler.tp_worker.model_runner`` in both
    releases (0.5.17 managers/scheduler.py:899 + tp_worker.py:80; 0.5.23
    managers/scheduler.py:1033 + tp_worker.py:87)."""
    return scheduler.tp_worker.model_runner


def kv_pool(scheduler: Any) -> Any:
    """The token-to-KV pool (``mem_cache/allocator/base.py:60`` in 0.5.17, ``:202`` in 0.5.23)."""
    return scheduler.token_to_kv_pool_allocator.get_kvcache()


def draft_kv_pool(scheduler: Any) -> Any:
    """The speculative draft model's KV pool that SGLang ships beside the target's, or
    None (no draft model: no speculative decoding, or NGRAM). Both versions hand it to
    the PD bootstrap / prealloc queue as ``draft_token_to_kv_pool``
    (``disaggregation/prefill.py``:134 in 0.5.17, :194 in 0.5.23; ``decode.py``) and
    append its ``get_contiguous_buf_infos()`` to ``kv_args.kv_data_ptrs``; its slots are
    the target's (the draft shares the target's ``req_to_token`` rows)."""
    for name in ("disagg_prefill_bootstrap_queue", "disagg_decode_prealloc_queue"):
        queue = getattr(scheduler, name, None)
        if queue is not None:
            return getattr(queue, "draft_token_to_kv_pool", None)
    return None


def draft_kv_layers(server_args: Any, target_layers: int) -> int:
    """Layers of the draft model's KV pool a server with these arguments will have
    (0: no draft model), for sizing before the pools exist. Read from the draft
    checkpoint's ``config.json`` (``num_hidden_layers``; MTP/NEXTN drafts:
    ``num_nextn_predict_layers``); ``target_layers`` when it cannot be read (an upper
    bound: a draft is never deeper than its target in the setups SGLang ships)."""
    import json
    from pathlib import Path

    algo = str(server_arg(server_args, "speculative_algorithm", None) or "").upper()
    if not algo or algo == "NGRAM":
        return 0
    path = server_arg(server_args, "speculative_draft_model_path", None) or server_arg(
        server_args, "model_path", None
    )
    try:
        config = json.loads((Path(str(path)) / "config.json").read_text())
        config = config.get("text_config", config)
        if algo in ("NEXTN", "MTP") and config.get("num_nextn_predict_layers"):
            return int(config["num_nextn_predict_layers"])
        return int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(target_layers)


def kv_manager(scheduler: Any) -> Any:
    """The scheduler's PD KV manager, or None (``managers/scheduler.py:1340/1375`` in
    0.5.17, ``:1593/1625`` in 0.5.23: the prealloc / bootstrap queue own it)."""
    for name in ("disagg_prefill_bootstrap_queue", "disagg_decode_prealloc_queue"):
        queue = getattr(scheduler, name, None)
        if queue is not None and getattr(queue, "kv_manager", None) is not None:
            return queue.kv_manager
    return None


def req_pool_idx(req: Any) -> int | None:
    """The request's ``req_to_token`` row (None before it has one)."""
    kv = getattr(req, "kv", None)  # 0.5.23: Req.kv.req_pool_idx (disaggregation/prefill.py:1581)
    if kv is not None and getattr(kv, "req_pool_idx", None) is not None:
        return int(kv.req_pool_idx)
    idx = getattr(req, "req_pool_idx", None)  # 0.5.17 (disaggregation/prefill.py:989)
    return None if idx is None else int(idx)


def extend_whole_prompt(req: Any, num_tokens: int) -> None:
    """Make a new ``Req`` extend over its whole prompt of ``num_tokens`` (no prefix), as
    ``benchmark/one_batch.py`` does: 0.5.17 ``req.set_extend_range(0, n)`` (:458), 0.5.23
    ``req.extend_end = n`` (:473)."""
    if hasattr(req, "set_extend_range"):  # 0.5.17
        req.set_extend_range(0, int(num_tokens))
    else:
        req.extend_end = int(num_tokens)


def prompt_slots(scheduler: Any, room: int) -> tuple[Any, str] | None:
    """``(slots, rid)`` of a prefill request at its last chunk: int64 ``[prompt_len]``
    pool slots of every prompt position (prefix the decode holds included; on the
    pool's device), or None.

    The request sits in ``disagg_prefill_inflight_queue`` when its last chunk is
    sent (``disaggregation/prefill.py:505`` in 0.5.17, ``:1158`` region in 0.5.23).
    Only used to score importance over the whole prompt when the decode reuses
    a prefix; without it the sent tokens are scored alone.
    """
    for req in reversed(getattr(scheduler, "disagg_prefill_inflight_queue", None) or []):
        if getattr(req, "bootstrap_room", None) != room:
            continue
        idx = req_pool_idx(req)
        if idx is None:
            return None
        n = len(req.origin_input_ids)
        # a copy on the pool's device, queued on the scheduler's stream (no host sync here)
        row = scheduler.req_to_token_pool.req_to_token[idx, :n]
        return row.to(torch.int64, copy=True), str(req.rid)
    return None


def extend_rows(batch: Any, sender_type: type) -> list[tuple[int, Any, str, int, int, int]]:
    """The prefill requests of an extend ``ScheduleBatch`` about to run whose sender is a
    ``sender_type``: ``(room, sender, rid, start, tokens, offset)`` each, the chunk's prompt
    positions ``[start, start + tokens)`` at ``batch.out_cache_loc[offset : offset +
    tokens]`` (int64 pool slots on the pool's device); [] for any other batch.

    ``ScheduleBatch.prepare_for_extend`` sets ``prefix_lens``/``extend_lens`` per request
    and the concatenated ``out_cache_loc`` before ``Scheduler.run_batch`` (0.5.17
    ``managers/schedule_batch.py``:2208/2493, 0.5.23 :2885/3074).
    """
    mode = getattr(batch, "forward_mode", None)
    if mode is None or not mode.is_extend() or getattr(batch, "out_cache_loc", None) is None:
        return []
    prefix_lens = list(getattr(batch, "prefix_lens", None) or [])
    extend_lens = list(getattr(batch, "extend_lens", None) or [])
    reqs = list(getattr(batch, "reqs", None) or [])
    if not (len(reqs) == len(prefix_lens) == len(extend_lens)):
        return []
    rows, offset = [], 0
    for req, start, n in zip(reqs, prefix_lens, extend_lens):
        sender = getattr(req, "disagg_kv_sender", None)
        if isinstance(sender, sender_type):
            rows.append((int(req.bootstrap_room), sender, str(req.rid), int(start), int(n), offset))
        offset += int(n)
    return rows


def prefill_graph_backend(server_args: Any) -> str:
    """The prefill CUDA-graph backend (``disabled``, ``breakable``, ``full``...): what the
    flags say (``--disable-cuda-graph``, ``--cuda-graph-backend-prefill``), else the
    resolved config (0.5.17: ``ServerArgs.cuda_graph_config``; 0.5.23: the runtime
    context's ``exec`` namespace, ``arg_groups/cuda_graph_hook.py``), else SGLang's
    default (none on a CPU, breakable on CUDA)."""
    if server_arg(server_args, "disable_cuda_graph", False):
        return "disabled"
    backend = server_arg(server_args, "cuda_graph_backend_prefill", None)
    if backend is None:
        config = getattr(server_args, "cuda_graph_config", None)
        if config is None:
            try:
                from sglang.srt.runtime_context import get_exec

                config = get_exec().cuda_graph_config
            except Exception:  # not resolved in this process (the launcher)
                config = None
        if isinstance(config, dict):  # (0.5.23's resolved ServerArgs hold a dict)
            backend = (config.get("prefill") or {}).get("backend")
        else:
            backend = getattr(getattr(config, "prefill", None), "backend", None)
    if backend is None:
        backend = "disabled" if server_arg(server_args, "device", None) == "cpu" else "breakable"
    return str(getattr(backend, "value", backend)).lower()


def prefill_graph_problem(server_args: Any) -> str:
    """'' if this server runs its prefill forwards eagerly (every attention layer's
    Python ``forward`` is called per batch), else why not: a prefill CUDA graph
    (:func:`prefill_graph_backend`; breakable is SGLang's CUDA default) replays its
    layers without them."""
    backend = prefill_graph_backend(server_args)
    if backend == "disabled":
        return ""
    return (
        f"--spectrum-layer-group needs eager prefill forwards, but the prefill CUDA graph"
        f" backend is {backend}; add --cuda-graph-backend-prefill disabled (or"
        " --disable-cuda-graph), or use --spectrum-layer-group 0"
    )


def cpu_server_flags(mode: str, found: str | None = None) -> list[str]:
    """Extra flags a PD server needs to run on a CPU-only torch.

    0.5.23's decode infers ``--disaggregation-decode-retraction-backup host_pool``
    (``arg_groups/pd_disaggregation_hook.py``), whose pinned host pool needs CUDA
    (``mem_cache/pool_host/common.py:147``); per-request CPU tensors work. 0.5.17
    has no such option.
    """
    found = found or sglang_version()
    if mode == "decode" and found != "0.5.17":
        return ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
    return []


def apply_cpu_defaults(ns: Any) -> None:
    """Make a ``spectrum`` PD server on a CPU-only machine start with the documented
    command alone (the launcher's parsed arguments, before ``ServerArgs`` exists):
    :func:`cpu_server_flags` (0.5.23's decode retraction backup) unless the user
    chose one, and :func:`cpu_server_env` in the environment the scheduler processes
    inherit."""
    import os

    if getattr(ns, "device", None) != "cpu":
        return
    mode = getattr(ns, "disaggregation_mode", "null")
    if mode == "decode" and getattr(ns, "disaggregation_decode_retraction_backup", "") is None:
        flags = cpu_server_flags("decode")
        if flags:
            ns.disaggregation_decode_retraction_backup = flags[1]
    for key, value in cpu_server_env().items():
        os.environ.setdefault(key, value)


def cpu_server_env() -> dict[str, str]:
    """Environment a PD server needs on a CPU-only torch: 0.5.23's prefill sends a cached
    prefix early and records a ``torch.cuda.Event`` for it
    (``disaggregation/prefill.py:1494``), which a CPU torch cannot create."""
    return {"SGLANG_DISAGG_PREFILL_EARLY_SEND_CACHED_PREFIX": "0"}


def server_arg(server_args: Any, name: str, default: Any = None) -> Any:
    """A ``ServerArgs`` field (or argparse namespace attribute), ``default`` when the
    version has no such field (e.g. 0.5.23-only options on 0.5.17)."""
    return getattr(server_args, name, default)


def resolved_server_arg(server_args: Any, name: str, default: Any = None) -> Any:
    """A resolved ``ServerArgs`` field (what SGLang decided, not the raw flag).

    0.5.23: ``ServerArgs`` is a msgspec record whose fields keep the raw input;
    what resolution decided lives in declarations read by
    ``arg_groups.overrides.resolution_result`` (overrides.py:178). 0.5.17: the
    declarations are materialised into the (sealed) fields, a plain read.
    """
    if server_args is None:
        return default
    try:
        from sglang.srt.arg_groups.overrides import resolution_result
    except ImportError:  # 0.5.17
        return getattr(server_args, name, default)
    try:
        return resolution_result(server_args, name, default)
    except Exception:  # not a ServerArgs (a stand-in object)
        return getattr(server_args, name, default)


def needs_mlp_sync(model_runner: Any) -> bool:
    """True where a forward needs the DP-attention MLP sync (the probe refuses it):
    ``require_mlp_sync()`` (0.5.23 utils/common.py:4163, reads the runtime context)
    or ``require_mlp_sync(server_args)`` (0.5.17 utils/common.py:3626)."""
    import inspect

    from sglang.srt.utils import require_mlp_sync

    if inspect.signature(require_mlp_sync).parameters:  # 0.5.17
        return bool(require_mlp_sync(model_runner.server_args))
    return bool(require_mlp_sync())


def start_bootstrap_clock(sender: Any) -> None:
    """0.5.23 starts the sender's bootstrap-timeout clock in ``CommonKVSender.__init__``
    (``common/conn.py``:2181); 0.5.17 starts it nowhere (``init_time`` stays None)."""
    if sender.init_time is None:
        sender.init_time = time.time()


def is_device_destination(destination: Any) -> bool:
    """0.5.23's ``send_metadata(destination=KVTransferDestination.DEVICE|HOST)``; 0.5.17
    passes none (always the device pool)."""
    return destination is None or str(getattr(destination, "value", destination)) == "device"


def chunked_prefill_size(scheduler: Any) -> int:
    """The resolved chunked-prefill size of a scheduler (0 = off). ``ServerArgs`` keeps
    ``None`` in 0.5.23 when the size is chosen per GPU; ``Scheduler.init_chunked_prefill``
    stores the resolved value (``managers/scheduler.py``:1137 in 0.5.17, :1352 in 0.5.23)."""
    size = getattr(scheduler, "chunked_prefill_size", None)
    return int(size) if size is not None and int(size) > 0 else 0


def context_len(scheduler: Any) -> int | None:
    """The longest request the server admits (``scheduler.model_config.context_len``)."""
    return getattr(getattr(scheduler, "model_config", None), "context_len", None)


def metadata_device(scheduler: Any) -> torch.device | None:
    """Device of the PD metadata buffers: host memory, or CUDA under
    ``SGLANG_MOONCAKE_CUSTOM_MEM_POOL=INTRA_NODE_NVLINK`` (``disaggregation/utils.py``
    ``MetadataBuffers``: :290 in 0.5.17, :422 in 0.5.23)."""
    buffers = getattr(scheduler, "disagg_metadata_buffers", None)
    ids = getattr(buffers, "output_ids", None)
    return ids.device if isinstance(ids, torch.Tensor) else None


def fp8_pool(pool: Any, model_runner: Any) -> Any:
    """The :class:`~sglang_spectrum.fp8.FP8Pool` of an FP8 KV pool (None for 16/32-bit
    pools). SGLang stores FP8 KV as uint8 buffers and keeps the logical dtype in
    ``MHATokenToKVPool.dtype``; writes divide by the attention layer's ``k_scale`` /
    ``v_scale`` (``RadixAttention.k_scale_float``, None = 1.0;
    ``layers/radix_attention.py`` in both versions; ``mem_cache/memory_pool.py``
    ``set_kv_buffer``)."""
    from sglang_spectrum.fp8 import FP8_DTYPES, FP8Pool
    from sglang_spectrum.sizes import dtype_name

    dtype = getattr(pool, "dtype", None)
    if dtype is None or dtype_name(dtype) not in FP8_DTYPES:
        return None
    num_layers = len(pool.k_buffer)
    k_scales: list[float | None] = [None] * num_layers
    v_scales: list[float | None] = [None] * num_layers
    from sglang.srt.layers.radix_attention import RadixAttention

    model = getattr(model_runner, "model", None)
    for module in model.modules() if model is not None else ():
        if isinstance(module, RadixAttention) and 0 <= module.layer_id < num_layers:
            k_scales[module.layer_id] = getattr(module, "k_scale_float", None)
            v_scales[module.layer_id] = getattr(module, "v_scale_float", None)
    return FP8Pool.of(dtype, num_layers, k_scales, v_scales)


@contextlib.contextmanager
def peer_kv_dtype(manager: Any, bootstrap_addr: str) -> Any:
    """While SGLang's ``CommonKVManager.try_ensure_parallel_info`` runs, let the decode's
    ``kv_cache_dtype_str`` read as the prefill's: both versions refuse any KV cache dtype
    difference there (``common/conn.py``:538 in 0.5.17, :1329 in 0.5.23), and the
    spectrum codec pairs bf16/fp16 and FP8 pools every way (checked against the
    prefill's announced layout right after). The prefill's dtype is read from its
    bootstrap server's ``/route`` summary (the same request SGLang makes)."""
    import requests

    ours = manager.kv_cache_dtype_str
    try:
        url = (
            f"http://{bootstrap_addr}/route?prefill_dp_rank=-1&prefill_cp_rank=-1"
            "&target_tp_rank=-1&target_pp_rank=-1"
        )
        r = requests.get(url, timeout=5)
        theirs = r.json().get("kv_cache_dtype") if r.status_code == 200 else None
    except Exception:
        theirs = None
    if theirs is not None:
        manager.kv_cache_dtype_str = theirs
    try:
        yield
    finally:
        manager.kv_cache_dtype_str = ours


def tp_cpu_group(scheduler: Any) -> Any:
    """The scheduler's CPU (gloo) process group over its TP ranks, or None with one rank
    (``Scheduler.tp_cpu_group``: ``managers/scheduler.py``:1041 in 0.5.17, :1246 in 0.5.23)."""
    if int(getattr(scheduler, "tp_size", 1) or 1) <= 1:
        return None
    return getattr(scheduler, "tp_cpu_group", None)


def kv_memory_budget(model_runner: Any) -> int | None:
    """Bytes SGLang is about to give the KV pool (called right before
    ``ModelRunner.alloc_memory_pool``): free device memory minus the slack
    ``pre_model_load_memory * (1 - mem_fraction_static)`` that both versions keep
    (``mem_cache/kv_cache_configurator.py``:1625 in 0.5.17, :3007 in 0.5.23).
    None off CUDA or when the runner lacks those fields."""
    device = getattr(model_runner, "device", None)
    pre = getattr(model_runner, "pre_model_load_memory", None)
    mfs = getattr(model_runner, "mem_fraction_static", None)
    if str(device) != "cuda" or pre is None or mfs is None or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(getattr(model_runner, "gpu_id", None))
    return int(free - float(pre) * (1 << 30) * (1.0 - float(mfs)))


def planned_kv_layout(model_runner: Any) -> tuple[dict[str, Any], int] | None:
    """(layout, longest request in tokens) of the MHA KV pool a runner is about to
    allocate (right before ``alloc_memory_pool``), or None when a field is missing.

    The layout has :func:`.manager.pool_layout`'s keys but ``page_size``: layers
    (``model_config.num_hidden_layers`` plus a speculative draft's, :func:`draft_kv_layers`;
    pipeline parallelism is refused), KV heads of
    this attention-TP rank (``model_config.get_num_kv_heads(attn_tp_size)``, as both
    versions' ``mem_cache/kv_cache_configurator.py`` size the pool, with
    ``runtime_context.get_parallel()``), ``head_dim`` and the resolved
    ``ModelRunner.kv_cache_dtype`` (set by ``configure_kv_cache_dtype`` before the pool:
    ``model_executor/model_runner.py``:629 in 0.5.17, :735 in 0.5.23). The longest
    request is ``model_config.context_len``, capped by ``--max-total-tokens``."""
    from sglang_spectrum.fp8 import dtype_name

    config = getattr(model_runner, "model_config", None)
    try:
        from sglang.srt.runtime_context import get_parallel

        attn_tp = int(get_parallel().attn_tp_size)
    except Exception:
        attn_tp = int(getattr(model_runner, "tp_size", 1) or 1)
    server_args = getattr(model_runner, "server_args", None)
    try:
        layers = int(config.num_hidden_layers)
        layout = {
            "layers": layers + draft_kv_layers(server_args, layers),
            "kv_heads": int(config.get_num_kv_heads(attn_tp)),
            "head_dim": int(config.head_dim),
            "dtype": dtype_name(model_runner.kv_cache_dtype),
        }
        tokens = int(config.context_len)
    except (AttributeError, TypeError, ValueError):
        return None
    cap = server_arg(server_args, "max_total_tokens", None)
    if cap:
        tokens = min(tokens, int(cap))
    return layout, tokens


def is_draft_runner(model_runner: Any) -> bool:
    """A speculative-decoding draft model's runner (``ModelRunner.is_draft_worker``)."""
    return bool(getattr(model_runner, "is_draft_worker", False))


def unsupported_deployment(server_args: Any, options: Any = None) -> str:
    """'' if the ``spectrum`` backend serves this server's configuration (``options``:
    its :class:`.options.SpectrumServerOptions`, default the published ones), else one
    line saying what it cannot serve (checked in the launcher and again in each
    scheduler).

    * pipeline / context parallelism, KV-cache sharding (0.5.23), staging buffers
      (``SGLANG_DISAGG_STAGING_BUFFER``), the ``prefill_complete`` decode allocation
      policy (0.5.23: its BOOTSTRAP frames and deferred allocation are not ours);
    * a prefill with ``--spectrum-layer-group`` and a prefill CUDA graph
      (:func:`prefill_graph_problem`) or speculative decoding (the draft's layers run
      after the target's, outside the groups).
    """
    import os

    if options is None:
        from ..options import current_options

        options = current_options()
    if options.layer_group and server_arg(server_args, "disaggregation_mode") == "prefill":
        if server_arg(server_args, "speculative_algorithm", None):
            return (
                "--spectrum-layer-group does not support speculative decoding (the draft"
                " model's layers run after the target's); use --spectrum-layer-group 0"
            )
        problem = prefill_graph_problem(server_args)
        if problem:
            return problem

    def on(name: str) -> bool:
        return bool(server_arg(server_args, name, False))

    if int(server_arg(server_args, "pp_size", 1) or 1) > 1:
        return "SpectrumKV does not support pipeline parallelism (--pp-size > 1)"
    for name in ("attn_cp_size", "dcp_size"):
        if int(server_arg(server_args, name, 1) or 1) > 1:
            return f"SpectrumKV does not support context parallelism (--{name.replace('_', '-')})"
    if on("enable_kv_cache_sharding"):
        return "SpectrumKV does not support --enable-kv-cache-sharding"
    if server_arg(server_args, "disaggregation_decode_allocation_policy", "early") not in (
        None,
        "early",
    ):
        return (
            "SpectrumKV supports --disaggregation-decode-allocation-policy early only (got"
            f" {server_arg(server_args, 'disaggregation_decode_allocation_policy')})"
        )
    if os.environ.get("SGLANG_DISAGG_STAGING_BUFFER", "").strip().lower() in ("1", "true"):
        return (
            "SpectrumKV does not use SGLang's staging buffers: unset SGLANG_DISAGG_STAGING_BUFFER"
        )
    return ""
