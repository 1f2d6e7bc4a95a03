"""Prefill interference: how much concurrent packing slows the prefill's forward.

The backend packs a chunk's KV on its transfer worker's own CUDA stream while the
scheduler runs the next chunk's forward on SGLang's stream, so the pack (and the host
staging copy under Mooncake TCP) competes with the forward for SMs and HBM bandwidth.

The forward is a Llama-3-8B-shaped stand-in in torch (bf16, 32 layers: RMSNorm, QKV
projection 4096 -> 6144, causal SDPA with GQA 32/8 heads over the chunk, output
projection, SwiGLU MLP 4096 -> 2 x 14336 -> 4096): the matmul and attention shapes of
SGLang's forward of one chunk, not SGLang's kernels (one layer's weights serve every
layer; at 436 MB they never stay in L2, so the traffic is the same). The packer calls
``transfer.pack_request`` (the backend's request-path call) on a Llama-3-8B KV pool
(``bench/request_path.py``'s synthetic KV, paged slots), then copies the packed bytes
into pinned host memory on the same stream (host staging), from its own thread and
stream. For each (tokens, budget, key scales), CUDA events on the default stream time
the forward of a ``tokens``-token chunk:

- ``alone``: nothing else on the GPU;
- ``per_chunk``: one part of ``tokens`` tokens packed and staged, started with the
  forward (what the backend does: one part per chunk);
- ``continuous``: parts packed and staged back to back for the whole forward (the
  upper bound: many small parts, layer groups, several requests' parts);
- ``layer_groups``: what ``--spectrum-layer-group N`` does (``--layer-group``, default 8):
  the forward records a CUDA event after every N layers, the packer waits on each and
  packs those layers of the chunk (the first group scored and allocated, the later ones
  with its ``transfer.ChunkTiers``), staging each part;
- ``per_chunk_queued`` / ``continuous_queued``: the same, the packer started only once
  the forward's launches are all queued: what is left is the contention on the GPU (SMs,
  HBM); the difference to the unqueued modes is the host's (the packer's Python holds the
  GIL the forward's launches wait for, as in SGLang, whose scheduler shares a process with
  the transfer workers).

``slowdown = forward / forward_alone - 1`` (medians of ``--iters``, the three modes
interleaved per iteration so clock drift hits them alike). Issue 17's bound: <= 5 %.
Writes ``interference.json`` (``hardware`` field) and ``interference.md``::

    python bench/interference.py --out bench/results        # H200
"""

from __future__ import annotations

import pathlib
import queue
import statistics
import sys
import threading

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from request_path import (  # noqa: E402
    gpu_bench_parser,
    make_pools,
    paged_slots,
    run_gpu_bench,
)

from sglang_spectrum.config import SpectrumConfig  # noqa: E402
from sglang_spectrum.transfer import ChunkTiers, pack_request, packed_size_bound  # noqa: E402

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, FFN = 4096, 32, 8, 128, 14336
TARGET_SLOWDOWN = 0.05


class StandInForward:
    """Llama-3-8B-shaped prefill forward of one chunk (bf16), ``layers`` layers sharing
    one layer's weights. ``__call__(x)``: ``x`` ``[T, 4096]`` -> ``[T, 4096]``."""

    def __init__(self, layers: int, device: torch.device, gen: torch.Generator):
        def w(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, device=device, generator=gen, dtype=torch.bfloat16) * (
                cols**-0.5
            )

        self.layers = layers
        self.qkv = w((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        self.o = w(HIDDEN, Q_HEADS * HEAD_DIM)
        self.gate_up = w(2 * FFN, HIDDEN)
        self.down = w(HIDDEN, FFN)

    def __call__(self, x: torch.Tensor, after_layer=None) -> torch.Tensor:
        """``after_layer(i)`` runs after layer ``i``'s launches (SGLang's hook point)."""
        t = x.shape[0]
        for i in range(self.layers):
            h = F.rms_norm(x, (HIDDEN,))
            q, k, v = F.linear(h, self.qkv).split(
                [Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1
            )
            q = q.view(t, Q_HEADS, HEAD_DIM).transpose(0, 1)[None]
            k = k.view(t, KV_HEADS, HEAD_DIM).transpose(0, 1)[None]
            v = v.view(t, KV_HEADS, HEAD_DIM).transpose(0, 1)[None]
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + F.linear(a[0].transpose(0, 1).reshape(t, -1), self.o)
            gate, up = F.linear(F.rms_norm(x, (HIDDEN,)), self.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, self.down)
            if after_layer is not None:
                after_layer(i)
        return x


class Packer:
    """A transfer worker: its own thread and CUDA stream; ``pack_once`` packs one part
    with ``pack_request`` and stages it into pinned host memory, ``run_until`` repeats
    that until the flag is set. Returns the parts packed."""

    def __init__(self, kp, vp, slots, cfg: SpectrumConfig, device: torch.device):
        self.kp, self.vp, self.slots, self.cfg = kp, vp, slots, cfg
        layers, heads, dim = len(kp), int(kp[0].shape[1]), int(kp[0].shape[2])
        bound = packed_size_bound(int(slots.numel()), layers, heads, dim, torch.bfloat16, cfg)
        self.region = torch.empty(bound, dtype=torch.uint8, device=device)
        self.host = torch.empty(bound, dtype=torch.uint8, pin_memory=True)
        self.stream = torch.cuda.Stream(device=device)
        self.parts = 0

    def pack_once(self) -> None:
        with torch.cuda.stream(self.stream):
            res = pack_request(self.kp, self.vp, self.slots, self.cfg, out=self.region)
            self.host[: res.nbytes].copy_(self.region[: res.nbytes], non_blocking=True)
            self.stream.synchronize()
        self.parts += 1

    def run_until(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.pack_once()

    def pack_groups(self, groups: queue.Queue) -> None:
        """Pack the layer groups ``(l0, l1, event)`` of ``groups`` (until None) as the
        prefill's worker does: wait for the group's event, pack its layers (the later
        groups with the first's ``ChunkTiers``), stage the part."""
        chosen = None
        while (item := groups.get()) is not None:
            l0, l1, event = item
            event.synchronize()
            with torch.cuda.stream(self.stream):
                k, v = self.kp[l0:l1], self.vp[l0:l1]
                res = pack_request(k, v, self.slots, self.cfg, out=self.region, tiers=chosen)
                self.host[: res.nbytes].copy_(self.region[: res.nbytes], non_blocking=True)
                self.stream.synchronize()
            chosen = chosen or ChunkTiers.of(res)
            self.parts += 1


def time_forward(
    forward: StandInForward, x: torch.Tensor, packer: Packer | None, mode: str, group: int = 8
):
    """Device time (ms) of one forward on the default stream, with the packer in ``mode``
    (``alone``, ``per_chunk``, ``continuous``, ``layer_groups`` of ``group`` layers) from
    its own thread; and parts packed."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    stop, worker, after_layer = threading.Event(), None, None
    parts0 = packer.parts if packer else 0
    groups: queue.Queue = queue.Queue()
    if mode.startswith("per_chunk"):
        worker = threading.Thread(target=packer.pack_once)
    elif mode.startswith("continuous"):
        worker = threading.Thread(target=packer.run_until, args=(stop,))
    elif mode == "layer_groups":
        worker = threading.Thread(target=packer.pack_groups, args=(groups,))

        def after_layer(i: int) -> None:  # as the prefill's hook: an event per group
            if (i + 1) % group == 0 or i + 1 == forward.layers:
                event = torch.cuda.Event()
                event.record()
                groups.put((i // group * group, i + 1, event))

    queued = mode.endswith("_queued")
    start.record()
    if worker is not None and not queued:
        worker.start()
    forward(x, after_layer)
    end.record()
    groups.put(None)
    if worker is not None and queued:
        worker.start()
    end.synchronize()
    stop.set()
    if worker is not None:
        worker.join()
    torch.cuda.synchronize()
    return start.elapsed_time(end), (packer.parts - parts0) if packer else 0


def run(args) -> dict:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    forward = StandInForward(args.layers, device, gen)
    num_pages = -(-max(args.tokens) // args.page) + 8
    kp, vp = make_pools(
        args.layers, KV_HEADS, HEAD_DIM, num_pages * args.page, torch.bfloat16, device, gen
    )
    host_gen = torch.Generator().manual_seed(0)
    rows = []
    modes = ("alone", "per_chunk", "continuous", "per_chunk_queued", "continuous_queued")
    modes += ("layer_groups",)
    for tokens in args.tokens:
        x = torch.randn(tokens, HIDDEN, device=device, generator=gen, dtype=torch.bfloat16)
        slots = paged_slots(tokens, args.page, num_pages, host_gen, device)
        for budget in args.budgets:
            for keys in args.key_scales:
                cfg = SpectrumConfig(budget=budget, key_scales=keys, allow_drop=False)
                packer = Packer(kp, vp, slots, cfg, device)
                for _ in range(args.warmup):
                    for mode in modes:
                        time_forward(forward, x, packer, mode, args.layer_group)
                times = {m: [] for m in modes}
                parts = {m: [] for m in modes}
                for _ in range(args.iters):
                    for mode in modes:
                        ms, n = time_forward(forward, x, packer, mode, args.layer_group)
                        times[mode].append(ms)
                        parts[mode].append(n)
                alone = statistics.median(times["alone"])
                row = {
                    "tokens": tokens,
                    "budget": budget,
                    "key_scales": keys,
                    "forward_alone_ms": round(alone, 3),
                }
                for mode in modes[1:]:
                    ms = statistics.median(times[mode])
                    row[f"forward_{mode}_ms"] = round(ms, 3)
                    row[f"slowdown_{mode}"] = round(ms / alone - 1, 4)
                    row[f"parts_{mode}"] = statistics.median(parts[mode])
                rows.append(row)
                print(row, flush=True)
                del packer
    return {
        "hardware": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "layers": args.layers,
        "layer_group": args.layer_group,
        "iters": args.iters,
        "target_slowdown": TARGET_SLOWDOWN,
        "records": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "# Prefill interference: the forward with concurrent packing",
        "",
        f"{result['hardware']}, torch {result['torch']}; Llama-3-8B-shaped stand-in forward"
        f" ({result['layers']} layers, bf16) of one chunk on the default stream, median of"
        f" {result['iters']}; the packer (`pack_request` + host staging copy) on its own"
        " thread and stream (`bench/interference.py`).",
        "",
        "Slowdown of the forward; in brackets the parts packed during it. *queued*: the"
        " packer started after the forward's launches were queued (GPU contention alone).",
        "",
        "| tokens | b | keys | forward alone ms | one part | back to back | one part, queued"
        f" | back to back, queued | layer groups of {result.get('layer_group', 8)}"
        " | one part <= 5 % | layer groups <= 5 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        shown = ("per_chunk", "continuous", "per_chunk_queued", "continuous_queued")
        shown += ("layer_groups",) * ("slowdown_layer_groups" in r)
        cells = [f"{r[f'slowdown_{m}']:+.1%} ({r[f'parts_{m}']:g})" for m in shown]
        cells += [""] * (5 - len(cells))
        for m in ("per_chunk", "layer_groups"):
            slow = r.get(f"slowdown_{m}")
            target = result["target_slowdown"]
            cells.append("" if slow is None else "met" if slow <= target else "MISSED")
        lines.append(
            f"| {r['tokens']} | {r['budget']} | {r['key_scales']} | {r['forward_alone_ms']}"
            f" | {' | '.join(cells)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = gpu_bench_parser(__doc__, tokens=[8192, 2048], budgets=[0.3, 0.5])
    ap.add_argument("--key-scales", nargs="+", default=["token", "channel"])
    ap.add_argument("--layer-group", type=int, default=8, help="layers a part (layer_groups)")
    run_gpu_bench("interference", ap.parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
