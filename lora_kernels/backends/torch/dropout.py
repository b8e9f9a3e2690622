"""Dropout inside the torch backend's GEMMs: ``(X ⊙ Z) Aᵀ`` forward, ``dX += α·(T ⊙ Z)`` and ``(G B)ᵀ (X ⊙ Z)``
backward, row chunk by row chunk, so the masked ``X`` is never materialised in full and never stored.

Per chunk of rows (``CPU_CHUNK_BYTES``, so it stays in cache between the two steps that touch it) the mask is
evaluated once: on CPU by the fused native pass (:mod:`.native`: hash + select + scale in one pass; in backward one
pass serves both ``dX`` and ``dA``), elsewhere or without the native build by torch ops
(:func:`lora_kernels.backends.mask.keep_mask_fast`). Either way the values are the oracle's: ``X ⊙ Z / (1-p)`` in
the activation dtype (:func:`lora_kernels.backends.mask.apply_dropout`), handed to the GEMMs in the accumulation
dtype as the precision contract in :mod:`.lora` says (fp32 accumulation; bf16/fp16 operands are exact in fp32).

Inputs that fit one chunk (the host-bound small shapes) take a straight path: no slicing, no preallocated outputs.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .. import mask as _mask
from . import native

# Bytes of one chunk's buffer (fp32 X ⊙ Z rows); README "CPU results" has the measurement behind the choice.
CPU_CHUNK_BYTES = 1 << 19
GPU_CHUNK_ELEMS = 1 << 24  # torch-op fallback on a GPU: few, large launches

_ACC = {torch.float32: torch.float32, torch.float16: torch.float32, torch.bfloat16: torch.float32}
_consts: dict[float, tuple[int, float]] = {}  # p -> (keep threshold, 1 / (1 - p))
_zeros: dict[tuple, torch.Tensor] = {}
_tls = threading.local()  # per-thread scratch of the one-chunk path (the native pass releases the GIL)
SCRATCH_ENTRIES = 8  # (slot, M, K, dtype) buffers kept per thread, each at most ~CPU_CHUNK_BYTES (x2 for fp64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return _ACC.get(dtype, torch.float64)


def _constants(p: float) -> tuple[int, float]:
    c = _consts.get(p)
    if c is None:
        if len(_consts) >= 64:
            _consts.clear()
        c = _consts[p] = (_mask.keep_threshold(p), 1.0 / (1.0 - p))
    return c


def _setup(x2: torch.Tensor):
    """``(native module or None, rows per chunk)`` for this input (the torch-op path while torch.compile traces)."""
    m, k = x2.shape
    if x2.is_cpu:
        rows = max(1, min(m, CPU_CHUNK_BYTES // (4 * max(k, 1))))
        return (None if torch.compiler.is_compiling() else native.module()), rows
    return None, max(1, min(m, GPU_CHUNK_ELEMS // max(k, 1)))


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim zero: the ignored ``input`` of ``addmm(beta=0)`` (cached, except while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return torch.zeros((), dtype=dtype, device=device)
    z = _zeros.get((dtype, device))
    if z is None:
        z = _zeros[(dtype, device)] = torch.zeros((), dtype=dtype, device=device)
    return z


def scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s · (a @ b)`` with the scale applied by the GEMM: ``mm`` + ``mul_`` by a Python float pays a scalar-tensor
    conversion (~10 us at small shapes, measured) on every call."""
    return torch.addmm(_zero(a.dtype, a.device), a, b, beta=0, alpha=s)


def _scratch(slot: int, m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """An ``[m, k]`` CPU buffer reused across calls of one shape (small inputs: allocation is a visible share).

    Only for values consumed before the function returns (nothing that escapes to autograd or the caller).
    """
    d = getattr(_tls, "d", None)
    if d is None:
        d = _tls.d = {}
    key = (slot, m, k, dtype)
    t = d.get(key)
    if t is None:
        if len(d) >= SCRATCH_ENTRIES:
            d.clear()
        t = d[key] = torch.empty(m, k, dtype=dtype)
    return t


def _keep(seed: int, offset: int, rows: int, k: int, p: float, x2: torch.Tensor) -> torch.Tensor:
    return _mask.keep_mask_fast(seed, offset, rows, k, p, device=x2.device)


def dropped_xa(x2: torch.Tensor, a: torch.Tensor, seed: int, offset: int, p: float) -> torch.Tensor:
    """``(X ⊙ Z / (1-p)) Aᵀ`` as ``[M, r]`` in the accumulation dtype; ``a`` is ``A`` in the activation dtype."""
    m, k = x2.shape
    acc = _acc(x2.dtype)
    a_acc = a if a.dtype == acc else a.to(acc)
    a_t = a_acc.t()
    lib, rows = _setup(x2)
    if lib is None:
        xa = torch.empty((m, a.shape[0]), dtype=acc, device=x2.device)
        for s in range(0, m, rows):
            e = min(m, s + rows)
            xd = _mask.apply_dropout(x2[s:e], seed, offset + s * k, p, _keep(seed, offset + s * k, e - s, k, p, x2))
            torch.mm(xd if xd.dtype == acc else xd.to(acc), a_t, out=xa[s:e])
        return xa
    thr, inv_keep = _constants(p)
    nt, code = torch.get_num_threads(), native.DTYPE_CODES[x2.dtype]
    sxm, sxk = x2.stride()
    if rows >= m:  # one chunk
        xd = _scratch(0, m, k, acc)
        lib.dropout_forward(x2.data_ptr(), sxm, sxk, xd.data_ptr(), k, m, k, code, seed, offset, thr, inv_keep, nt)
        return F.linear(xd, a_acc)  # = xd @ a_accᵀ
    xa = torch.empty(m, a.shape[0], dtype=acc)
    buf = torch.empty(rows, k, dtype=acc)
    ptr, step = x2.data_ptr(), sxm * x2.element_size()
    for s in range(0, m, rows):
        n = min(rows, m - s)
        lib.dropout_forward(ptr + s * step, sxm, sxk, buf.data_ptr(), k, n, k, code, seed, offset + s * k, thr,
                            inv_keep, nt)  # fmt: skip
        torch.mm(buf if n == rows else buf[:n], a_t, out=xa[s : s + n])
    return xa


def dropped_backward(x2, gbr, a, dx, need_da: bool, scale_s: float, seed: int, offset: int, p: float):
    """The masked part of the backward, one mask evaluation per chunk for both uses.

    ``dx`` (``[M, K]`` activation dtype, holding ``G W``, or None) gets ``+= s/(1-p) · (GBR A) ⊙ Z`` in place;
    returns ``s · GBRᵀ (X ⊙ Z / (1-p))`` (``[r, K]``, accumulation dtype) when ``need_da``, else None.
    """
    m, k = x2.shape
    dt = x2.dtype
    acc = _acc(dt)
    if m == 0 or k == 0:
        return torch.zeros((a.shape[0], k), dtype=acc, device=x2.device) if need_da else None
    alpha = scale_s / (1.0 - p)  # the oracle's multiplier, rounded the same way
    gbr_t = (gbr if gbr.dtype == acc else gbr.to(acc)).t() if need_da else None
    lib, rows = _setup(x2)
    if lib is None:
        return _backward_torch(x2, gbr, gbr_t, a, dx, need_da, scale_s, alpha, seed, offset, p, rows)
    thr, inv_keep = _constants(p)
    nt, code = torch.get_num_threads(), native.DTYPE_CODES[dt]
    sxm, sxk = x2.stride()
    dx_ptr, sdm = (dx.data_ptr(), dx.stride(0)) if dx is not None else (0, 0)
    if rows >= m:  # one chunk
        t = torch.mm(gbr, a, out=_scratch(1, m, k, dt)) if dx is not None else None
        xd = _scratch(0, m, k, acc) if need_da else None
        lib.dropout_backward(x2.data_ptr(), sxm, sxk, 0 if xd is None else xd.data_ptr(), k,
                             0 if t is None else t.data_ptr(), k, dx_ptr, sdm, m, k, code, seed, offset, thr, inv_keep,
                             alpha, nt)  # fmt: skip
        return scaled_mm(gbr_t, xd, scale_s) if need_da else None
    da = torch.zeros(a.shape[0], k, dtype=acc) if need_da else None
    t_buf = torch.empty(rows, k, dtype=dt) if dx is not None else None
    xd_buf = torch.empty(rows, k, dtype=acc) if need_da else None
    xd_ptr = xd_buf.data_ptr() if need_da else 0
    t_ptr = t_buf.data_ptr() if dx is not None else 0
    x_ptr, x_step, dx_step = x2.data_ptr(), sxm * x2.element_size(), sdm * x2.element_size()
    for s in range(0, m, rows):
        n = min(rows, m - s)
        if dx is not None:
            torch.mm(gbr[s : s + n], a, out=t_buf if n == rows else t_buf[:n])
        lib.dropout_backward(x_ptr + s * x_step, sxm, sxk, xd_ptr, k, t_ptr, k, dx_ptr and dx_ptr + s * dx_step, sdm,
                             n, k, code, seed, offset + s * k, thr, inv_keep, alpha, nt)  # fmt: skip
        if need_da:
            da.addmm_(gbr_t[:, s : s + n], xd_buf if n == rows else xd_buf[:n])
    return da.mul_(scale_s) if need_da else None


def _backward_torch(x2, gbr, gbr_t, a, dx, need_da, scale_s, alpha, seed, offset, p, rows):
    """:func:`dropped_backward` with the mask from torch ops (GPU, no native build, or torch.compile tracing)."""
    m, k = x2.shape
    acc = _acc(x2.dtype)
    da = torch.zeros((a.shape[0], k), dtype=acc, device=x2.device) if need_da else None
    for s in range(0, m, rows):
        e = min(m, s + rows)
        keep = _keep(seed, offset + s * k, e - s, k, p, x2)
        if dx is not None:
            dx[s:e].add_(torch.mm(gbr[s:e], a).mul_(keep), alpha=alpha)
        if need_da:
            xd = _mask.apply_dropout(x2[s:e], seed, offset + s * k, p, keep)
            da.addmm_(gbr_t[:, s:e], xd if xd.dtype == acc else xd.to(acc))
    return da.mul_(scale_s) if need_da else None
