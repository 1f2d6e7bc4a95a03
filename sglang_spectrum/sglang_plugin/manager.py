"""The ``spectrum`` KV manager: SGLang's ``CommonKVManager`` + the packed-KV transport.

One manager per scheduler process (TP rank). ``CommonKVManager`` gives the ZMQ
PULL socket (``rank_port``), the prefill rank's registration at the bootstrap
server, the room status table, failure records, cached PUSH sockets and (decode)
the prefill discovery and heartbeat. On top of that this class runs:

* a **control thread** reading the PULL socket: our tagged messages
  (:mod:`.messages`): on the prefill ``Register``/``Grant``/``Abort`` from decode
  ranks; on the decode ``Sent``/``Failed``/``AbortAck`` from prefill ranks. The
  decode unpacks in this thread (off the scheduler loop): validate once, write
  the KV into the request's slots with :func:`sglang_spectrum.transfer.unpack_request`,
  write the metadata row, then mark the room ``Success``.
* (prefill) SGLang's ``CommonKVSender.send`` hands each chunk to
  :meth:`add_transfer_request` (:mod:`.prefill_intake`), which enqueues parts;
  **transfer workers** (:mod:`.prefill_side`, a pack and a write thread per
  decode peer) pack each part with :func:`sglang_spectrum.transfer.pack_request`
  on their own CUDA stream (after an event recorded on the scheduler's stream,
  so the KV is final) straight into a registered send region, write it with one
  Mooncake write per decode rank into the receive region the decode granted,
  and after the last part send ``Sent`` and mark the room ``Success``.

The KV pool is handed over at the end of ``Scheduler.__init__`` (:meth:`attach`,
from :mod:`.plugin`); the prefill then runs the INT4 probe and publishes its
identity at the bootstrap server.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from typing import Any

import requests
import torch
import zmq
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.common.conn import CommonKVManager
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.utils.network import NetworkAddress

from . import compat, messages
from .decode_side import SWEEP_INTERVAL_S, DecodeSide
from .direct import PoolMemory
from .identity import layout_desc, wire_identity
from .layer_pipeline import LayerPipeline
from .metrics import get_metrics
from .options import check_no_drop, current_options, no_drop_floor, staging_problem
from .prefill_intake import PrefillIntake, expand_pages  # noqa: F401 (expand_pages: re-export)
from .prefill_side import PrefillSide
from .transport import (
    AuxRows,
    RegisteredArena,
    arena_bytes,
    longest_receive_region,
    mooncake_engine,
    pool_nbytes,
    region_bytes,
    take_reserved,
)

logger = logging.getLogger(__name__)

SEND_DEPTH = 4  # prefill: send regions of one part each the arena holds at least


def pool_layout(
    k_pools: list[torch.Tensor], page_size: int, fp8: Any = None, draft_layers: int = 0
) -> dict[str, Any]:
    """The KV layout a server announces; ``dtype`` is the logical one (an FP8 pool's
    float8 dtype, not its uint8 storage); ``layers`` counts the speculative draft's
    ``draft_layers`` too (the last ones)."""
    k0 = k_pools[0]
    return {
        "layers": len(k_pools),
        "kv_heads": int(k0.shape[1]),
        "head_dim": int(k0.shape[2]),
        "dtype": fp8.name if fp8 is not None else str(k0.dtype).removeprefix("torch."),
        "page_size": int(page_size),
        "draft_layers": int(draft_layers),
    }


def warm_up_kernels(
    k_pools: list[torch.Tensor],
    v_pools: list[torch.Tensor],
    arena: RegisteredArena,
    configs: list[Any],
    region_bound: Any,
    fp8: Any = None,
) -> list[str]:
    """Pack the first 64 slots of the pools and unpack them into the same slots, once per
    codec config, through a region of ``arena`` (``region_bound(tokens, cfg)`` bytes):
    the kernels compile here, not in a request. A receive arena in pinned host memory
    (host staging) gets the bytes as a part arrives there: packed into a scratch buffer
    on the pools' device, then copied in. Returns each config's path (``kernels`` or
    ``torch``); stops early (shorter list) when the arena has no room; raises what the
    request path raises."""
    from sglang_spectrum.transfer import pack_request, unpack_request

    device = k_pools[0].device
    n = min(64, int(k_pools[0].shape[0]))
    slots = torch.arange(n, dtype=torch.int64, device=device)
    paths = []
    for cfg in configs:
        bound = region_bound(n, cfg)
        region = arena.alloc(bound)
        if region is None:
            break
        try:
            view = region.view()
            out = view
            if view.device != device:  # host staging: pack on the device, stage it in
                out = torch.empty(bound, dtype=torch.uint8, device=device)
            info = pack_request(k_pools, v_pools, slots, cfg, out=out, fp8=fp8)
            if out is not view:
                view[: info.nbytes].copy_(out[: info.nbytes])
            unpack_request(view, k_pools, v_pools, slots, fp8=fp8)
            paths.append(info.path)
        finally:
            region.release()
    return paths


def _pool_problem(pool: Any) -> str:
    """'' for a plain MHA token pool with per-layer NHD ``[slots, kv_heads, head_dim]``
    K and V buffers of a supported dtype, else why not, in one line."""
    name = type(pool).__name__
    if not (hasattr(pool, "k_buffer") and hasattr(pool, "v_buffer")):
        return f"{name} has no per-layer k_buffer/v_buffer (MHA token pools only)"
    if any(s in name for s in ("SWA", "Hybrid", "NSA", "DSA", "MXFP", "FP4", "MLA")):
        return f"{name}: only plain MHA pools are supported"
    if getattr(pool, "use_hnd", False):
        return "HND KV layout is not supported (NHD only)"
    k, v = list(pool.k_buffer), list(pool.v_buffer)
    if not k or len(k) != len(v) or any(t.dim() != 3 or t.shape != k[0].shape for t in [*k, *v]):
        return f"{name}: expected per-layer [slots, kv_heads, head_dim] K and V buffers"
    from sglang_spectrum.sizes import SOURCE_DTYPES, dtype_name

    dt = getattr(pool, "dtype", k[0].dtype)  # FP8 pools store uint8
    if dtype_name(dt) not in SOURCE_DTYPES:
        return f"KV cache dtype {dt} is not supported (supported: {', '.join(SOURCE_DTYPES)})"
    return ""


class SpectrumKVManager(LayerPipeline, PrefillIntake, PrefillSide, DecodeSide, CommonKVManager):
    """Packed-KV transfers over Mooncake on SGLang's ``CommonKVManager`` (see module doc)."""

    supports_role_switch = False

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: DisaggregationMode,
        server_args: Any,
        is_mla_backend: bool | None = False,
    ):
        compat.check_sglang_version()
        self.options = current_options()
        self.is_prefill = disaggregation_mode == DisaggregationMode.PREFILL
        self.role = "prefill" if self.is_prefill else "decode"
        self.k_pools: list[torch.Tensor] = []
        self.v_pools: list[torch.Tensor] = []
        self.draft_layers = 0  # of them, the speculative draft model's (after the target's)
        self.layout: dict[str, Any] | None = None
        self.fp8: Any = None  # FP8Pool of an FP8 KV pool (attach)
        self.arena: RegisteredArena | None = None
        self.staging: RegisteredArena | None = None  # prefill, --spectrum-staging host
        self.pool_memory: PoolMemory | None = None  # registered for direct writes (attach)
        self.longest_tokens = 0  # of the longest request this server admits (attach)
        self.metrics: Any = None
        self.scheduler: Any = None
        self.tiers = self.options.tiers if self.options.tiers != "auto" else "2"
        self.instance_id = ""  # prefill: the bootstrap server's instance (see endpoints)
        self.chunk_tokens = 0  # the resolved chunked-prefill size (attach)
        self.aux_rows = AuxRows(args.aux_data_ptrs, args.aux_item_lens)
        self._lock = threading.RLock()
        self._fault_counter = [0]
        self._stop = threading.Event()
        problem = compat.unsupported_deployment(server_args) or staging_problem(
            self.options.staging
        )
        if problem:
            raise RuntimeError(problem)
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        if is_mla_backend:
            raise RuntimeError("SpectrumKV supports MHA KV pools only (this model uses MLA)")
        if getattr(args, "state_types", None):
            raise RuntimeError(
                "SpectrumKV supports plain MHA KV pools only; this model also has"
                f" {[str(s) for s in args.state_types]} state (hybrid SWA/mamba/DSA pools)"
            )
        if self.pp_size != 1 or self.attn_cp_size != 1:
            raise RuntimeError("SpectrumKV does not support pipeline or context parallelism")
        self._init_pipeline()
        if self.is_prefill:
            self._init_prefill()
            self._init_intake()
        else:
            self._init_decode()
        self.engine = mooncake_engine(self.local_ip, args.gpu_id, args.ib_device or None)
        self.session_id = self.engine.get_session_id()
        threading.Thread(target=self._control_loop, name="spectrum-control", daemon=True).start()
        if not self.is_prefill:
            self._start_heartbeat_checker_thread()

    # ------------------------------------------------------------------ contract hooks

    def should_verify_kv_checksum(self, bootstrap_addr: str) -> bool:
        return False  # lossy KV: the prefill's checksum of its 16-bit KV cannot match

    # ------------------------------------------------------------------ startup

    def attach(self, scheduler: Any) -> None:
        """Take the KV pool at the end of ``Scheduler.__init__``; prefill: probe, publish."""
        self.scheduler = scheduler
        pool = compat.kv_pool(scheduler)
        draft = compat.draft_kv_pool(scheduler)
        problem = self._unsupported(pool, draft)
        if problem:
            raise RuntimeError(f"SpectrumKV cannot serve this model: {problem}")
        # A speculative draft's layers follow the target's, at the same slots and tiers:
        # the request path sees one pool of target + draft layers (the handshake compares
        # layer counts, so a prefill and a decode must agree on the draft too).
        self.draft_layers = len(draft.k_buffer) if draft is not None else 0
        self.k_pools = list(pool.k_buffer) + (list(draft.k_buffer) if draft is not None else [])
        self.v_pools = list(pool.v_buffer) + (list(draft.v_buffer) if draft is not None else [])
        self.fp8 = compat.fp8_pool(pool, compat.model_runner(scheduler))
        self.layout = pool_layout(self.k_pools, self.kv_args.page_size, self.fp8, self.draft_layers)
        self.chunk_tokens = compat.chunked_prefill_size(scheduler)
        check_no_drop(self.options, self.layout["head_dim"])
        device = self.k_pools[0].device
        args = self.kv_args
        self.aux_rows = AuxRows(
            args.aux_data_ptrs, args.aux_item_lens, compat.metadata_device(scheduler)
        )
        # host staging: the decode receives into pinned host memory (the GPU keeps no
        # receive arena); the prefill packs on the GPU and sends from a host copy
        host = torch.device("cpu")
        receive_on_host = self.options.host_staging and not self.is_prefill
        size, reserved, largest = self._arena_size(scheduler, host if receive_on_host else device)
        if largest > size and not self.is_prefill and not self.options.arena_mb:
            # the receiver has no fallback buffer: refuse now, not every long request
            raise RuntimeError(
                f"SpectrumKV decode: the {size / (1 << 20):.0f} MiB receive arena cannot hold"
                f" the longest request this server admits ({self.longest_tokens}"
                f" tokens need {largest / (1 << 20):.0f} MiB at --spectrum-budget"
                f" {'auto' if self.options.adaptive else f'{self.options.budget:g}'}); lower"
                " --context-length or --max-total-tokens,"
                " or set --spectrum-arena-mb"
            )
        self.arena = RegisteredArena(
            size,
            host if receive_on_host else device,
            self.engine,
            "send" if self.is_prefill else "receive",
            buf=reserved,
        )
        if self.is_prefill and self.options.host_staging:
            self.staging = RegisteredArena(size, host, self.engine, "send staging")
            logger.info(
                "SpectrumKV prefill: packed parts are sent from a %.1f MiB host staging arena"
                " (pinned: %s)",
                size / (1 << 20),
                self.staging.buf.is_pinned(),
            )
        self.pool_memory = self._direct_pool_memory()
        self.metrics = get_metrics(self.server_args, self.role)
        logger.info(
            "SpectrumKV %s: KV pool %s (%s, %.1f MiB), %s arena %.1f MiB on %s (%s; the"
            " longest request needs %.1f MiB), options %s",
            self.role,
            type(pool).__name__,
            layout_desc(self.layout),
            pool_nbytes(self.k_pools, self.v_pools) / (1 << 20),
            self.arena.name,
            size / (1 << 20),
            self.arena.buf.device,
            "inside SGLang's memory plan" if reserved is not None else "allocated now",
            largest / (1 << 20),
            self.options.to_dict(),
        )
        if largest > size:  # an explicit --spectrum-arena-mb, or a prefill (one-off buffers)
            logger.warning(
                "SpectrumKV %s: the %.1f MiB arena cannot hold the longest request's %.1f MiB"
                " buffer; such requests %s. Raise --spectrum-arena-mb.",
                self.role,
                size / (1 << 20),
                largest / (1 << 20),
                "are sent from one-off buffers" if self.is_prefill else "fail with a clear error",
            )
        if device.type == "cuda":
            self._warm_up()
        if self.is_prefill and self.layer_group:
            self.start_pipelining()
        if self.is_prefill:
            self._resolve_tiers(scheduler)
            if self.metrics is not None:
                self.metrics.set_mode(self.tiers, self.options.budget)
            self._publish_identity()

    def _direct_pool_memory(self) -> PoolMemory | None:
        """The KV pool, registered with the engine, when lossless parts may be written
        page to page (``--spectrum-direct auto``, the pool in memory the link reads:
        host memory, or GPU memory without host staging); else None."""
        if self.options.direct == "off":
            return None
        if self.k_pools[0].is_cuda and self.options.host_staging:
            return None
        dtype = str(self.layout["dtype"])
        if self.fp8 is not None:  # FP8 bytes mean the same only under the same scales
            dtype += f"/{zlib.crc32(repr((self.fp8.k_scales, self.fp8.v_scales)).encode()):08x}"
        memory = PoolMemory.of(self.k_pools, self.v_pools, dtype)
        if memory is None:
            return None
        ret = memory.register(self.engine)
        if ret != 0:
            logger.warning(
                "SpectrumKV %s: Mooncake could not register the KV pool (ret=%s): lossless"
                " parts are packed, not written page to page",
                self.role,
                ret,
            )
            return None
        logger.info("SpectrumKV %s: KV pool registered: lossless parts go page to page", self.role)
        return memory

    def _unsupported(self, pool: Any, draft: Any = None) -> str:
        """'' if the request path can pack ``pool`` (and the speculative ``draft`` pool,
        if any), else why not, in one line."""
        problem = _pool_problem(pool)
        if problem:
            return problem
        from sglang_spectrum.fp8 import FP8_DTYPES
        from sglang_spectrum.sizes import dtype_name

        ptrs = [t.data_ptr() for t in [*pool.k_buffer, *pool.v_buffer]]
        if draft is not None:
            problem = _pool_problem(draft)
            if problem:
                return f"the speculative draft model's KV pool: {problem}"
            t, d = pool.k_buffer[0], draft.k_buffer[0]
            dt, ddt = getattr(pool, "dtype", t.dtype), getattr(draft, "dtype", d.dtype)
            if t.shape != d.shape or dtype_name(dt) != dtype_name(ddt):
                return (
                    "the speculative draft model's KV layout (per layer"
                    f" {list(d.shape)} {dtype_name(ddt)}) differs from the target's"
                    f" ({list(t.shape)} {dtype_name(dt)}); SpectrumKV packs drafts whose"
                    " KV heads, head_dim and dtype match the target's"
                )
            if dtype_name(dt) in FP8_DTYPES:
                return (
                    "a speculative draft model over an FP8 KV cache (its scales are the"
                    " draft checkpoint's) is not supported; use a 16-bit KV cache"
                )
            ptrs += [t.data_ptr() for t in [*draft.k_buffer, *draft.v_buffer]]
        # SGLang registers exactly these buffers for transfer (target K, target V, then
        # the draft's K and V); anything else there would not reach the decode
        if list(self.kv_args.kv_data_ptrs) != ptrs:
            return "the KV buffers SGLang registers for transfer are not the pools' K and V"
        return ""

    def _resolve_tiers(self, scheduler: Any) -> None:
        if self.options.tiers != "auto":
            self.tiers = self.options.tiers
            return
        if not self.options.adaptive and self.options.budget >= 1.0:  # all FP16: no INT4
            logger.info("SpectrumKV: budget 1.0 sends every token at FP16; INT4 probe skipped")
            self.tiers = "3"
            return
        from .probe_hook import run_startup_probe

        decision = run_startup_probe(scheduler, self.server_args, self.options)
        self.tiers = str(decision.get("tiers", "2"))
        floor = no_drop_floor(
            self.tiers, self.layout["head_dim"], self.options.group_size, self.options.key_scales
        )
        if self.options.lowest_budget < floor:
            logger.warning(
                "SpectrumKV: the probe chose %s tiers; the budget %g is below their"
                " no-drop floor %.3f, long prompts will be sent at that floor",
                self.tiers,
                self.options.lowest_budget,
                floor,
            )

    def identity(self) -> dict[str, Any]:
        fields: dict[str, Any] = dict(
            layout=self.layout, attn_tp_size=self.attn_tp_size, role=self.role
        )
        if self.is_prefill:
            fields["tiers_resolved"] = self.tiers
            fields["stream_chunk_tokens"] = self.stream_chunk_tokens()
            fields["instance"] = self.instance_id
        return wire_identity(self.options.to_dict(), **fields)

    def region_bound(
        self,
        num_tokens: int,
        config: Any,
        chunk_tokens: int = 0,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> int:
        """:func:`.transport.region_bytes` of this server's KV layout (``kwargs``: its
        ``layers`` and ``groups``)."""
        return region_bytes(self.layout, num_tokens, config, chunk_tokens, dtype, **kwargs)

    def full_bytes_per_token(self) -> int:
        """16-bit KV bytes of one token over every layer (what budgets are relative to)."""
        lay = self.layout
        return int(lay["layers"]) * 4 * int(lay["kv_heads"]) * int(lay["head_dim"])

    def _arena_size(self, scheduler: Any, device: torch.device) -> tuple[int, Any, int]:
        """(arena bytes, the memory reserved before the KV pool was sized or None,
        bytes of the longest request's region).

        The longest request (:meth:`_longest_tokens`) needs the receive side's bound
        (:meth:`~.options.SpectrumServerOptions.bound_codec`, one part per chunk); a
        prefill sending in parts holds one part's region per job in its workers' queues
        (two per peer pipeline, :data:`SEND_DEPTH` regions in all). With memory reserved
        by the ``alloc_memory_pool`` hook the arena is that memory (at most what it
        needs); otherwise (CPU) :func:`.transport.arena_bytes`."""
        tokens = self.longest_tokens = self._longest_tokens(scheduler)
        codec = self.options.bound_codec()
        if self.is_prefill:
            largest = self.region_bound(tokens, codec, self.chunk_tokens)
        else:
            largest = longest_receive_region(self.layout, tokens, codec, self.chunk_tokens)
        if self.is_prefill and self.stream_chunk_tokens():
            part = self.region_bound(min(tokens, self.chunk_tokens), codec)
            need = max(SEND_DEPTH * part, largest)
        else:
            need = arena_bytes(
                self.options.arena_mb,
                pool_nbytes(self.k_pools, self.v_pools),
                self.options.budget,
                largest,
            )
        if self.options.arena_mb:
            need = int(self.options.arena_mb * (1 << 20))
        reserved = take_reserved(device)
        if reserved is None:
            return need, None, largest
        if need < reserved.numel():  # give the rest back to the process (activations)
            reserved = None
            return need, torch.empty(need, dtype=torch.uint8, device=device), largest
        return reserved.numel(), reserved, largest

    def _longest_tokens(self, scheduler: Any) -> int:
        """Tokens of the longest request this server admits: the context length, at
        most the pool (its rows less the padding page SGLang adds)."""
        tokens = max(int(self.k_pools[0].shape[0]) - int(self.kv_args.page_size or 1), 1)
        context = compat.context_len(scheduler)
        return min(tokens, int(context)) if context else tokens

    def _warm_up(self) -> None:
        """JIT-compile the pack and unpack kernels now, not in the first request, at the
        fixed budget, or under ``auto`` at both ends of its range (the lossless gather
        and the codec: a compile inside a request would also mislead the cost estimate)."""
        budgets = {self.options.budget, self.options.lowest_budget}
        configs = [self.codec_config(b) for b in sorted(budgets)]
        try:
            paths = warm_up_kernels(
                self.k_pools, self.v_pools, self.arena, configs, self.region_bound, self.fp8
            )
        except Exception as e:
            logger.warning("SpectrumKV %s: kernel warm-up failed: %s", self.role, e)
            return
        for cfg, path in zip(configs, paths):
            logger.info(
                "SpectrumKV %s: kernels warmed up at b=%g (%s path)", self.role, cfg.budget, path
            )

    def stream_chunk_tokens(self) -> int:
        """Prefill: the chunk size its requests are sent in parts of (0 = one part)."""
        return self.chunk_tokens if self.options.stream == "chunks" else 0

    def _bootstrap_url(self) -> str:
        # the host CommonKVManager.register_to_bootstrap registers at; a wildcard bind
        # address (--host 0.0.0.0 / ::) is reached on the loopback of its family
        if self.dist_init_addr:
            host = NetworkAddress.parse(self.dist_init_addr).resolved().host
        else:
            host = self.bootstrap_host
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return NetworkAddress(host, self.bootstrap_port).to_url()

    def _publish_identity(self) -> None:
        payload = dict(
            self.identity(),
            attn_tp_rank=self.attn_tp_rank,
            attn_dp_rank=self.attn_dp_rank,
            system_dp_rank=self.system_dp_rank,
            system_dp_size=self.system_dp_size,
        )
        try:
            r = requests.put(f"{self._bootstrap_url()}/spectrum/register", json=payload, timeout=5)
            if r.status_code != 200:
                logger.error("SpectrumKV registration refused: %s %s", r.status_code, r.text)
            else:
                self.instance_id = str(r.json().get("instance", ""))
        except Exception as e:
            logger.error("SpectrumKV could not register at the bootstrap server: %s", e)

    def check_status(self, bootstrap_room: int) -> KVPoll:
        """SGLang's status of a room. On the prefill, a room the decode aborted before its
        sender existed reads Failed (creating the sender set it to Bootstrapping)."""
        if self.is_prefill and self.room_aborted(bootstrap_room):
            self.update_status(bootstrap_room, KVPoll.Failed)
        return super().check_status(bootstrap_room)

    def codec_config(self, budget: float | None = None) -> Any:
        """The prefill's codec config at ``budget`` (default: the fixed budget, or the
        largest one under ``--spectrum-budget auto``)."""
        return self.options.codec_config(
            budget=self.options.budget if budget is None else budget,
            tiers=self.tiers,
            allocator=self.options.allocator,
            allow_drop=False,
        )

    # ------------------------------------------------------------------ messaging

    def send_to(self, endpoint: str, port: int, msg: Any) -> None:
        na = NetworkAddress(endpoint, port)
        self._send_multipart_locked(na.to_tcp(), messages.encode(msg), is_ipv6=na.is_ipv6)

    def _housekeeping(self) -> None:
        """Timers of both roles (control thread, every :data:`SWEEP_INTERVAL_S` under any
        traffic): expired rooms and idle workers (prefill), overdue aborts and deferred
        grants (decode)."""
        if self.is_prefill:
            self.rooms.sweep()
            self.clear_stale_aborts()
            self._workers.reap_idle()
        else:
            self.sweep()
        if self.metrics is not None:
            self.metrics.set_state(self.state_sizes())

    def state_sizes(self) -> dict[str, int]:
        """Sizes of every per-request table of this rank (and arena bytes in use)."""
        sizes = {
            "request_status": len(self.request_status),
            "failure_records": len(self.failure_records),
            "arena_in_use": int(self.arena.in_use) if self.arena is not None else 0,
        }
        if self.is_prefill:
            sizes.update(self.rooms.sizes())
            sizes["sends"] = len(self._sends)
            sizes["pipelined_rooms"] = len(self._pipe_rooms)
            sizes["decode_prefix_len"] = len(self.req_to_decode_prefix_len)
            sizes["jobs_pending"] = self._workers.stats()["pending"]
        else:
            sizes.update(self.decode_sizes())
        return sizes

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server_socket, zmq.POLLIN)
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        while not self._stop.is_set():
            ready = poller.poll(int(SWEEP_INTERVAL_S * 1000))
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                try:
                    self._housekeeping()
                except Exception:
                    logger.exception("SpectrumKV: housekeeping failed")
            if not ready:
                continue
            frames = self.server_socket.recv_multipart()
            msg = messages.decode(frames)
            try:
                if msg is None:
                    logger.warning(
                        "SpectrumKV: dropped a message that is not ours (%d frames)", len(frames)
                    )
                elif self.is_prefill:
                    self._on_prefill_message(msg)
                else:
                    self._on_decode_message(msg)
            except Exception:  # never let one message kill the control thread
                logger.exception("SpectrumKV: failed to handle %s", type(msg).__name__)
