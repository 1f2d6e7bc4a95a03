"""Helpers shared by the launchers: dtype maps, pointer tables, launch options."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from ..codec import KVLayout
from ..config import SpectrumConfigError

TL_DTYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
    torch.uint8: tl.uint8,  # FP8 pools (SGLang's store dtype): bits, see ._fp8
}


def interpreted(kernel) -> bool:
    """True when ``kernel`` runs in Triton's CPU interpreter (it was decorated while
    ``TRITON_INTERPRET=1`` was set; the variable itself may be gone by now)."""
    return type(kernel).__name__ == "InterpretedFunction"


def launch_options(device: torch.device) -> dict:
    """Compile options: no mul+add contraction into FMA, so the quantiser rounds
    every float32 step exactly like the torch reference (separate kernels)."""
    return {} if device.type != "cuda" else {"enable_fp_fusion": False}


def wire_dtype(dtype: torch.dtype):
    """Triton dtype of the top tier on the wire for a pool of ``dtype`` (uint8: FP8 bits)."""
    return tl.float16 if dtype == torch.float32 else TL_DTYPES[dtype]


class Launch:
    """One launch of a Triton kernel whose arguments are fixed but for a few tensors (a
    plan's launch: every later layer group of a chunk makes the same one into other pools
    and another payload). Plan once, launch many.

    The first call for a 16-byte alignment of the given tensors goes through Triton's JIT,
    which binds the arguments, specialises (a pointer's specialisation is that alignment;
    everything else is fixed here) and finds or compiles the kernel; later calls with the
    same alignments launch that compiled kernel through its own launcher
    (``CompiledKernel[grid]``, current device and stream), without the JIT's binding and
    cache lookup: about half of a launch's host time for our 30-argument kernels. Under
    Triton's interpreter (no compiled kernel) every call takes the JIT.

    Args:
        kernel: the ``@triton.jit`` function.
        grid: its grid (1 to 3 dims).
        args: the leading positional arguments, None where each call gives a tensor (in
            order); the constexpr parameters after them come from ``options`` by name.
        options: constexpr values and compile options (``num_warps``, ...).
    """

    def __init__(self, kernel, grid: tuple, args: Sequence, options: dict):
        self.kernel, self.grid = kernel, (*grid, *(1,) * (3 - len(grid)))
        self.args, self.options = list(args), options
        self.given = [i for i, a in enumerate(self.args) if a is None]
        names = getattr(kernel, "arg_names", None) or []
        rest = names[len(self.args) :]
        # every parameter known by position or name: else only the JIT launches
        known = names and all(n in options for n in rest)
        self.tail = [options[n] for n in rest] if known else None
        self.runners: dict[tuple, object] = {}

    def __call__(self, *tensors: torch.Tensor) -> None:
        args = self.args.copy()
        for i, t in zip(self.given, tensors):
            args[i] = t
        key = tuple(t.data_ptr() % 16 == 0 for t in tensors)
        run = self.runners.get(key)
        if run is not None:
            run(*args, *self.tail)
            return
        compiled = self.kernel[self.grid](*args, **self.options)
        if self.tail is not None and getattr(compiled, "function", None) is not None:
            self.runners[key] = compiled[self.grid]


_TABLES: dict[tuple, tuple[torch.dtype, torch.Tensor]] = {}


def pointer_table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 ``[n]`` device tensor of the tensors' data pointers (one launch, all layers)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


def head_range(
    layout: KVLayout, pool_heads: int, heads: tuple[int, int] | None, error=None
) -> tuple[int, int]:
    """(first head ``h0``, heads per slot ``HP``) of the layout's ``num_kv_heads`` heads in
    pools of ``pool_heads`` heads: ``heads = (h0, h1)`` names them (``h1 - h0`` must be the
    layout's head count), None means all of them (the pools hold exactly the layout's)."""
    error = error or SpectrumConfigError
    n = layout.num_kv_heads
    if heads is None:
        if pool_heads != n:
            raise error(f"pools of {pool_heads} KV heads, the layout has {n}")
        return 0, pool_heads
    h0, h1 = (int(h) for h in heads)
    if not 0 <= h0 < h1 <= pool_heads:
        raise error(f"head range [{h0}, {h1}) out of bounds for pools of {pool_heads} KV heads")
    if h1 - h0 != n:
        raise error(f"head range [{h0}, {h1}) holds {h1 - h0} heads, the layout {n}")
    return h0, pool_heads


def pool_table(
    layout: KVLayout,
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    error=None,
    heads: tuple[int, int] | None = None,
) -> tuple[torch.dtype, torch.Tensor]:
    """Validated pools: their dtype and the int64 ``[2L]`` device table of K then V pointers
    (``heads``: the layout's heads are ``[h0, h1)`` of the pools', see :func:`head_range`).

    Cached by the pools' addresses (plus the first pool's dtype and shape), so
    SGLang's long-lived pools are checked and copied to the device once, and a
    launch neither waits on a pageable copy nor spends ~100 us in Python checks.
    """
    pools = [*k_pools, *v_pools]
    ref = pools[0]
    key = (
        str(ref.device),
        ref.dtype,
        tuple(ref.shape),
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
        heads,
        *map(torch.Tensor.data_ptr, pools),
    )
    hit = _TABLES.get(key)
    if hit is None:
        dtype = check_pools(layout, k_pools, v_pools, error, heads)
        if len(_TABLES) >= 64:
            _TABLES.clear()
        hit = _TABLES[key] = (dtype, pointer_table(pools, ref.device))
    return hit


def check_pools(
    layout: KVLayout,
    k_pools: Sequence[torch.Tensor],
    v_pools: Sequence[torch.Tensor],
    error=None,
    heads: tuple[int, int] | None = None,
) -> torch.dtype:
    """Validate per-layer ``[num_slots, HP, D]`` pools; returns their common dtype.

    Pools must be contiguous, on one device, of one dtype (bf16, fp16, fp32, or uint8
    holding FP8 bits: what they mean comes from the layout or an ``FP8Pool``), and hold
    the layout's heads (all ``HP``, or the range ``heads``, see :func:`head_range`).
    """
    error = error or SpectrumConfigError
    if len(k_pools) != layout.num_layers or len(v_pools) != layout.num_layers:
        raise error(
            f"layout has {layout.num_layers} layers, got {len(k_pools)} K and"
            f" {len(v_pools)} V pools"
        )
    ref = k_pools[0]
    if ref.dim() != 3 or ref.shape[2] != layout.head_dim:
        raise error(f"pools must be [slots, heads, {layout.head_dim}], got {tuple(ref.shape)}")
    head_range(layout, int(ref.shape[1]), heads, error)
    for layer, (k, v) in enumerate(zip(k_pools, v_pools)):
        for x in (k, v):
            if x.dim() != 3 or x.shape[1:] != ref.shape[1:]:
                raise error(
                    f"layer {layer}: pools must be [slots, {ref.shape[1]}, {ref.shape[2]}],"
                    f" got {tuple(x.shape)}"
                )
            if x.dtype != ref.dtype or x.device != ref.device or not x.is_contiguous():
                raise error(f"layer {layer}: pools must be contiguous, of one dtype and device")
    if ref.dtype not in TL_DTYPES:
        raise error(f"unsupported pool dtype {ref.dtype}")
    return ref.dtype
