"""Host-side helpers shared by the plans: launch counting, row views, alignment, device facts, dropout keys.

Inputs arrive validated (lora_kernels.functional.validate). Every Triton launch of this package goes through
:func:`launch_kernel`, which is where :func:`launch_counter` counts; library GEMMs issued by a plan are counted apart
(:func:`count_library`). The torch.zeros/empty allocations are not counted: they are not our kernels (NOTES.md
lists the full device-op budget).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field

import torch

from .kernels.rng import dropout_args

logger = logging.getLogger("lora_kernels")


# ---------------------------------------------------------------------------------------------- launch count
@dataclass
class LaunchCounter:
    count: int = 0  # Triton launches of this package
    kernels: list[str] = field(default_factory=list)  # their kernel names, and "library:<op>" for library GEMMs
    library: int = 0  # library GEMMs (cuBLAS through torch) issued by the library plan


_counters: list[LaunchCounter] = []
_counters_lock = threading.Lock()


@contextlib.contextmanager
def launch_counter():
    """``with launch_counter() as c: ...`` -> ``c.count`` Triton launches of this package inside the block."""
    c = LaunchCounter()
    with _counters_lock:
        _counters.append(c)
    try:
        yield c
    finally:
        with _counters_lock:
            _counters.remove(c)


def launch_kernel(kernel, grid, *args, count: bool = True, **meta) -> None:
    if count:
        for c in _counters:
            c.count += 1
            c.kernels.append(kernel.__name__)
    kernel[grid](*args, **meta)


def count_library(op: str) -> None:
    for c in _counters:
        c.library += 1
        c.kernels.append(f"library:{op}")


# ---------------------------------------------------------------------------------------------- helpers
def cdiv(a: int, b: int) -> int:
    # not triton.cdiv: that is a @triton.jit function, and calling one from Python costs ~7 us (JITFunction.__call__)
    return -(-a // b)


def r_pad(r: int) -> int:
    """Rank padded for tl.dot: next power of two, at least 16 (not triton.next_power_of_2: also a jit function)."""
    return max(16, 1 << (r - 1).bit_length())


def rows_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """Describe ``t[..., L]`` as rows ``m = b*seq + i`` without copying: ``(t, seq, stride_b, stride_m, stride_l)``.

    Leading dims merge when their strides chain (as ``view(-1, L)`` would); two groups remain addressable
    (e.g. ``x.transpose(0, 1)`` of a ``[B, T, K]`` tensor). More than two groups (rare: 4-D permuted inputs)
    falls back to ``reshape``, which copies.
    """
    shape, strides = t.shape, t.stride()
    if len(shape) == 2:  # the common case, without the loop below (host time: NOTES.md)
        return (t, shape[0], 0, strides[0], strides[1]) if shape[0] != 1 else (t, 1, 0, 0, strides[1])
    groups: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(shape[:-1], strides[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        t = t.reshape(-1, t.shape[-1])
        return rows_view(t)
    last = strides[-1]
    if not groups:
        return t, 1, 0, 0, last
    if len(groups) == 1:
        return t, groups[0][0], 0, groups[0][1], last
    return t, groups[1][0], groups[0][1], groups[1][1], last


def device_guard(t: torch.Tensor):
    """Switch the current CUDA device only when ``t`` is on another one (entering torch.cuda.device costs
    host time on every call even when it changes nothing)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_capabilities: dict[int, tuple[int, int]] = {}


def capability(t: torch.Tensor) -> tuple[int, int]:
    if not t.is_cuda:
        return (0, 0)
    idx = t.device.index
    cap = _capabilities.get(idx)
    if cap is None:
        cap = _capabilities[idx] = torch.cuda.get_device_capability(t.device)
    return cap


_max_shared_mem: dict[int, int | None] = {}


def max_shared(t: torch.Tensor) -> int | None:
    """Shared memory per block the device allows (bytes), as Triton's launcher checks it (OutOfResources); None
    when it cannot be asked (then the tables are used as written for sm_90 / sm_80). Called on a config-cache
    miss only."""
    if not t.is_cuda:
        return None
    idx = t.device.index
    if idx not in _max_shared_mem:
        value = None
        try:
            import triton

            value = int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        except Exception as e:  # a driver API change must not break launches: say so, use the tables
            logger.warning("lora_kernels.backends.triton: cannot read the device's shared memory size (%r); using the sm_90/"
                           "sm_80 tile tables as written", e)  # fmt: skip
        _max_shared_mem[idx] = value
    return _max_shared_mem[idx]


DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def aligned(sizes: tuple[int, ...], *tensors: torch.Tensor | None) -> bool:
    """Whether the launch gets Triton's alignment specialisation everywhere: every tensor's base 16-byte aligned
    and every non-unit stride (and each size in ``sizes``, which are row strides of the outputs) a multiple of
    16 *elements*, the rule Triton's JIT uses to mark integer arguments (``tt.divisibility = 16``). Without it the
    loads are element-wise and the main loop is not pipelined (configs.py docstring: such launches run on 4-warp
    tiles only). E.g. a bf16 row stride of 3000 elements is 16-byte aligned in bytes but not marked so."""
    for v in sizes:
        if v % 16:
            return False
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16:
            return False
        if t.shape[-1] % 16 == 0 and t.is_contiguous():
            continue  # row-major: every non-unit stride is a multiple of the last size (the per-call common case)
        for st, size in zip(t.stride(), t.shape):
            if st != 1 and size != 1 and st % 16:
                return False
    return True


_dropout_cache: dict[tuple[int, float], tuple[int, int, int, float]] = {}


def dropout(p: float, seed: int) -> tuple[int, int, int, float]:
    if p <= 0:
        return (0, 0, 0, 1.0)
    args = _dropout_cache.get((seed, p))
    if args is None:
        if len(_dropout_cache) > 4096:  # a new seed per step: keep the cache bounded
            _dropout_cache.clear()
        args = _dropout_cache[(seed, p)] = dropout_args(seed, p)
    return args


def xa_rt(xa: torch.Tensor, lora_R: torch.Tensor | None) -> torch.Tensor:
    """``XA Rᵀ`` in XA's dtype (XA itself without lora_R): the rank-r operand of Y's update and of dB."""
    if lora_R is None:
        return xa
    count_library("mm")
    return xa @ lora_R.t().to(xa.dtype)


def rows2d(t: torch.Tensor) -> torch.Tensor:
    """``t[..., L]`` as an ``[M, L]`` matrix for a library GEMM: a view when the leading dims merge (the usual
    case: contiguous activations and gradients), else a copy (e.g. a transposed 3-D x; the Triton launches read
    such tensors through strides, the library cannot)."""
    return t.reshape(-1, t.shape[-1])
