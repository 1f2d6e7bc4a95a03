"""Input checks of the request path (:mod:`.transfer`, :mod:`.receive`): SGLang's per-layer
KV pools, slot vectors, head ranges, and which implementation runs (Triton kernels on CUDA
pools, the torch reference otherwise)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .fp8 import check_fp8_pools
from .sizes import _LOCK, _dtype_name

# Tests only: run the kernel path on CPU tensors (Triton's interpreter, TRITON_INTERPRET=1).
_KERNELS_ON_CPU = False

_POOLS_OK: dict[tuple, bool] = {}


def check_pools(
    k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor], error, fp8=None
) -> torch.Tensor:
    """Validate per-layer ``[num_slots, H, D]`` pools (``fp8``: FP8 pools, see :mod:`.fp8`);
    returns layer 0's K pool. Raises ``error``."""
    if not isinstance(k_pools, (list, tuple)) or not isinstance(v_pools, (list, tuple)):
        raise error("k_pools and v_pools must be lists of per-layer tensors")
    if not k_pools or len(k_pools) != len(v_pools):
        raise error(f"got {len(k_pools)} K and {len(v_pools)} V pools (need the same, >= 1)")
    ref = k_pools[0]
    if ref.dim() != 3:
        raise error(f"pools must be [num_slots, kv_heads, head_dim], got {tuple(ref.shape)}")
    check_fp8_pools([ref], fp8, len(k_pools), error)
    # SGLang's pools live long: checked once per set of tensor objects and addresses
    pools = (*k_pools, *v_pools)
    key = (ref.shape, ref.dtype, ref.device, *map(id, pools), *map(torch.Tensor.data_ptr, pools))
    if key in _POOLS_OK:
        return ref
    for layer, (k, v) in enumerate(zip(k_pools, v_pools)):
        for x in (k, v):
            if x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
                raise error(f"layer {layer}: pools must share shape, dtype and device")
            if not x.is_contiguous():
                raise error(f"layer {layer}: pools must be contiguous")
    if fp8 is None:
        _dtype_name(ref.dtype, error)
    with _LOCK:
        if len(_POOLS_OK) >= 64:
            _POOLS_OK.clear()
        _POOLS_OK[key] = True
    return ref


def check_heads(heads, pool_heads: int, error) -> tuple[int, int] | None:
    """``heads`` as ``(h0, h1)`` ints with ``0 <= h0 < h1 <= pool_heads`` (None: every head,
    returned as None). Raises ``error``."""
    if heads is None:
        return None
    try:
        h0, h1 = (int(h) for h in heads)
    except (TypeError, ValueError):
        raise error(f"heads must be a pair (first, end) of ints, got {heads!r}") from None
    if not 0 <= h0 < h1 <= pool_heads:
        raise error(f"head range [{h0}, {h1}) out of bounds for pools of {pool_heads} KV heads")
    return h0, h1


def num_heads(heads: tuple[int, int] | None, pool_heads: int) -> int:
    """Heads of the range ``heads`` (None: all ``pool_heads``)."""
    return pool_heads if heads is None else heads[1] - heads[0]


def as_slots(slots, name: str, size: int, device: torch.device, error) -> torch.Tensor:
    """int64 ``[n]`` slots on ``device``, range-checked against pools of ``size`` slots."""
    s = torch.as_tensor(slots)
    if s.dim() != 1 or s.dtype.is_floating_point or s.dtype == torch.bool:
        raise error(f"{name} must be an integer vector, got shape {tuple(s.shape)} {s.dtype}")
    if s.numel():
        lo, hi = torch.stack(torch.aminmax(s)).tolist()  # one readback
        if lo < 0 or hi >= size:
            raise error(f"{name} out of range for pools of {size} slots ([{lo}, {hi}])")
    return s.to(device=device, dtype=torch.int64, non_blocking=True)


def kernels_for(device: torch.device):
    """``sglang_spectrum.kernels`` for pools on ``device`` (CUDA, or CPU under the tests'
    interpreter switch); None: the torch reference runs (CPU, or no Triton)."""
    if device.type != "cuda" and not _KERNELS_ON_CPU:
        return None
    try:
        from . import kernels  # installed mapping of the repo's kernels/
    except ImportError:
        return None
    return kernels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def on_device(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA (Triton launches on the current device, so a
    worker thread of another device still packs on the pools' one), else a no-op."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
