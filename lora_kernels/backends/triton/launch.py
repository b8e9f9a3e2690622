"""Launchers: shape/stride bookkeeping, allocation, config choice, grids, and launch counting.

Inputs arrive validated (lora_kernels.functional.validate); these functions assume consistent shapes and
dtypes. Every Triton launch of this package goes through :func:`_launch`, which is where
:func:`launch_counter` counts (the torch.zeros/empty allocations are not counted: they are not our kernels,
see NOTES.md for the full device-op budget).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from dataclasses import dataclass, field

import torch

from . import configs
from ._rng import dropout_args
from .backward import lora_bwd_kernel, sum_partials_kernel
from .forward import lora_fwd_kernel

logger = logging.getLogger("lora_kernels")

PLANS = ("auto", "fused", "split", "library")
PLAN_ENV = "LORA_KERNELS_TRITON_FWD_PLAN"
_plan: str | None = None
MAX_RANK = 256
# The plans (NOTES.md, "Plans"), forward / backward:
#   fused    one launch / one launch (two in deterministic mode): the kernels DESIGN.md budgets;
#   split    XA launch + Triton GEMM launch with the LoRA epilogue / the one-launch backward;
#   library  XA launch + the library GEMM (cuBLAS: torch.mm/addmm) with the rank-r update as its epilogue
#            (addmm_, alpha = s) / library GEMM dX = G W, an XA-mode launch for GB = G B, one epilogue launch
#            (dX's LoRA term under the regenerated mask, dA, dB, db).
# "auto": fused for M <= 64, library above (AUTO_LIBRARY_MIN_M). GPU run 5 (H200, M=8192, 4096->4096, r=16, bf16
# activations, fp32 adapters, do_bench medians, benchmarks/results/h200_20261130_run5/bench.md), fwd+bwd:
#   p=0  : library 1.088 ms < split 1.238 < fused 1.449     (base F.linear 0.823, PEFT 1.813, torch backend 0.975)
#   p=0.1: library 1.172 ms < split 1.457 < fused 3.404     (base 0.791, PEFT 1.977, torch backend 10.18)
# The Triton GEMM inside the fused/split kernels runs at ~650 TFLOP/s against cuBLAS's ~750 (forward: split 0.493
# vs base 0.384 ms) and the one-launch backward takes 0.72 ms for a 0.385 ms dX GEMM; the library plan keeps cuBLAS
# for the GEMMs and fuses the dropout / rank-r work (backward 0.576 vs 0.721 ms). The fused forward regenerates
# the dropout hash in each of the N/BN tile columns (p=0.1: 2.46 ms forward). At M <= 64 (decode) the call is
# host-bound (M=16: base 0.091 ms, fused 0.693, library 1.345 fwd+bwd: three launches + two GEMMs of host time),
# so one launch wins there.
AUTO_LIBRARY_MIN_M = 65
# Library plan's dB / db (an experiment for the next GPU run, NOTES.md "Next GPU run"): "epilogue" (default) adds
# dB's partials with fp32 atomics inside the epilogue launch (one more pass over G there); "launch" computes
# dB = s·Gᵀ (XA [Rᵀ]) with the forward kernel's XA-only mode run on (Gᵀ, (s·XA)ᵀ) (stores, no atomics) and
# db = Σ_rows G with torch.sum, leaving the epilogue only dX and dA.
LIBRARY_DB_ENV = "LORA_KERNELS_TRITON_LIBRARY_DB"


# ---------------------------------------------------------------------------------------------- forward plan
def set_forward_plan(plan: str | None) -> None:
    """``"auto"`` (default), ``"fused"`` (one launch), ``"split"`` (XA launch + GEMM launch) or ``"library"``
    (XA launch + library GEMMs; also selects the library backward); ``None`` = env / default. The backward of
    a call follows the plan its forward ran."""
    global _plan
    if plan is not None and plan not in PLANS:
        raise ValueError(f"forward plan must be one of {PLANS}, got {plan!r}")
    _plan = plan


@contextlib.contextmanager
def forward_plan(plan: str | None):
    """``with forward_plan("library"): ...``: :func:`set_forward_plan` for the block, the previous choice after."""
    global _plan
    saved = _plan
    set_forward_plan(plan)
    try:
        yield
    finally:
        _plan = saved


def get_forward_plan() -> str:
    if _plan is not None:
        return _plan
    env = os.environ.get(PLAN_ENV, "auto")
    if env not in PLANS:
        raise ValueError(f"environment variable {PLAN_ENV} must be one of {PLANS}, got {env!r}")
    return env


def resolve_plan(plan: str, m: int, dropout_p: float = 0.0) -> str:
    """The concrete plan (``fused``/``split``/``library``) for one call (``dropout_p`` is kept for a future rule)."""
    if plan == "auto":
        return "library" if m >= AUTO_LIBRARY_MIN_M else "fused"
    return plan


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


def _launch(kernel, grid, *args, count: bool = True, **meta) -> None:
    if count:
        for c in _counters:
            c.count += 1
            c.kernels.append(kernel.__name__)
    kernel[grid](*args, **meta)


def _count_library(op: str) -> None:
    for c in _counters:
        c.library += 1
        c.kernels.append(f"library:{op}")


# ---------------------------------------------------------------------------------------------- helpers
def _cdiv(a: int, b: int) -> int:
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


def grad_layout(r: int, k: int, n: int, need_da: bool, need_db: bool, need_dbias: bool, need_dr: bool = False):
    """``(off_dA, off_dB, off_db, off_dR, length)``: where dA [r, K], dB [N, r], db [N] and dR [r, r] (row-major)
    sit in the flat fp32 gradient buffer (-1: not computed), and the buffer's length."""
    off, out = 0, []
    for need, size in ((need_da, r * k), (need_db, n * r), (need_dbias, n), (need_dr, r * r)):
        out.append(off if need else -1)
        off += size if need else 0
    return (*out, off)


def _device_guard(t: torch.Tensor):
    """Switch the current CUDA device only when ``t`` is on another one (entering torch.cuda.device costs
    host time on every call even when it changes nothing)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_capabilities: dict[int, tuple[int, int]] = {}


def _capability(t: torch.Tensor) -> tuple[int, int]:
    if not t.is_cuda:
        return (0, 0)
    idx = t.device.index
    cap = _capabilities.get(idx)
    if cap is None:
        cap = _capabilities[idx] = torch.cuda.get_device_capability(t.device)
    return cap


_max_shared_mem: dict[int, int | None] = {}


def _max_shared(t: torch.Tensor) -> int | None:
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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels, also the dtype of XA and of the flat gradient buffer."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def _aligned(sizes: tuple[int, ...], *tensors: torch.Tensor | None) -> bool:
    """Whether the launch gets Triton's alignment specialisation everywhere: every tensor's base 16-byte aligned
    and every non-unit stride (and each size in ``sizes``, which are row strides of the outputs) a multiple of
    16 *elements*, the rule Triton's JIT uses to mark integer arguments (``tt.divisibility = 16``). Without it the
    loads are element-wise and the main loop is not pipelined (configs.py docstring: such launches run on 4-warp
    tiles only). E.g. a bf16 row stride of 3000 elements is 16-byte aligned in bytes but not marked so."""
    if any(v % 16 for v in sizes):
        return False
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16:
            return False
        for st, size in zip(t.stride(), t.shape):
            if st != 1 and size != 1 and st % 16:
                return False
    return True


_dropout_cache: dict[tuple[int, float], tuple[int, int, int, float]] = {}


def _dropout(p: float, seed: int) -> tuple[int, int, int, float]:
    if p <= 0:
        return (0, 0, 0, 1.0)
    args = _dropout_cache.get((seed, p))
    if args is None:
        if len(_dropout_cache) > 4096:  # a new seed per step: keep the cache bounded
            _dropout_cache.clear()
        args = _dropout_cache[(seed, p)] = dropout_args(seed, p)
    return args


# ---------------------------------------------------------------------------------------------- forward
def lora_forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, plan=None):
    """``(y, xa)``: ``y [..., N]`` in x's dtype and ``xa [M, r]`` in ``acc_dtype`` (fp32; fp64 for fp64 x).
    One launch (fused plan, the default for M <= 64), two (split), or one plus two library GEMMs (library, the
    default for M > 64: ``AUTO_LIBRARY_MIN_M``)."""
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    lead = x.shape[:-1]
    m = math.prod(lead)
    dtype = x.dtype
    y = torch.empty((*lead, n), dtype=dtype, device=x.device)
    xa = torch.empty((m, r), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=x.device)
    if m == 0 or n == 0:
        if m and n == 0:
            xa.zero_()  # no kernel runs; XA is still defined (only dA/dB of an N=0 layer would read it)
        return y, xa
    plan = resolve_plan(plan or get_forward_plan(), m, dropout_p)
    xs, seq, sxb, sxm, sxk = rows_view(x)
    rp = r_pad(r)
    rm = lora_R if lora_R is not None else lora_A  # any valid pointer when HAS_R is off
    key_lo, key_hi, thr, drop_scale = _dropout(dropout_p, seed)
    interpret = configs.interpreting()
    has_dropout = dropout_p > 0
    aligned = _aligned((n,), x, weight, lora_A, lora_B, lora_R)  # n: Y's row stride
    args = (
        xs, weight, bias if bias is not None else weight, lora_A, lora_B, rm, y, xa,
        m, n, k, r, seq,
        sxb, sxm, sxk, weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), rm.stride(0), rm.stride(1), n, 1,
        float(scale), int(offset), key_lo, key_hi, thr, drop_scale,
    )  # fmt: skip

    def run(cfg, xa_mode, count=True):
        bm, bn, bk, group_m, num_warps, num_stages = cfg
        grid = (_cdiv(m, bm) if xa_mode == 2 else _cdiv(m, bm) * _cdiv(n, bn),)
        _launch(
            lora_fwd_kernel, grid, *args,
            # XA_MODE 1 reads XA (dropout already applied): HAS_DROPOUT off there shares one compiled variant
            HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout and xa_mode != 1, HAS_R=lora_R is not None,
            XA_MODE=xa_mode, R_PAD=rp, IEEE=dtype == torch.float32, INTERPRET=interpret,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
            count=count,
        )  # fmt: skip

    def cands(mode):
        kind = ("fwd", "fwd_gemm", "fwd_xa")[mode]
        return configs.candidates(kind, m, rp, _DTYPE_NAMES[dtype], _capability(x), aligned, _max_shared(x))

    key = (configs.m_bucket(m), n, k, rp, dtype, lora_A.dtype, bias is not None, has_dropout, lora_R is not None,
           aligned, x.device.index)  # fmt: skip
    with _device_guard(x):
        if plan == "library":
            cfg = configs.choose("fwd2", key, lambda: cands(2), lambda c: run(c, 2, count=False))
            run(cfg, 2)
            _library_forward(x, weight, bias, lora_B, lora_R, scale, xa, y)
            return y, xa
        for mode in (0,) if plan == "fused" else (2, 1):
            cfg = configs.choose(
                f"fwd{mode}", key, lambda mode=mode: cands(mode), lambda c, mode=mode: run(c, mode, count=False)
            )
            run(cfg, mode)
    return y, xa


def _xa_rt(xa: torch.Tensor, lora_R: torch.Tensor | None) -> torch.Tensor:
    """``XA Rᵀ`` in XA's dtype (XA itself without lora_R): the rank-r operand of Y's update and of dB."""
    if lora_R is None:
        return xa
    _count_library("mm")
    return xa @ lora_R.t().to(xa.dtype)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """``t[..., L]`` as an ``[M, L]`` matrix for a library GEMM: a view when the leading dims merge (the usual
    case: contiguous activations and gradients), else a copy (e.g. a transposed 3-D x; the Triton launches read
    such tensors through strides, the library cannot)."""
    return t.reshape(-1, t.shape[-1])


def _library_forward(x, weight, bias, lora_B, lora_R, scale, xa, y) -> None:
    """The library plan's forward after its XA launch: ``Y = X Wᵀ (+ b)`` by the library GEMM, then
    ``Y += s·(XA [Rᵀ]) Bᵀ`` as that GEMM's beta=1 update (``addmm_``, alpha = s: one read and write of Y, fp32
    accumulation, one rounding). XA and B are rounded to the activation dtype as the fused kernel rounds them."""
    n, dt = weight.shape[0], y.dtype
    x2, y2 = _rows2d(x), y.view(-1, n)
    if bias is None:
        torch.mm(x2, weight.t(), out=y2)
    else:
        torch.addmm(bias, x2, weight.t(), out=y2)
    _count_library("mm")
    y2.addmm_(_xa_rt(xa, lora_R).to(dt), lora_B.t().to(dt), alpha=float(scale))
    _count_library("addmm_")


# ---------------------------------------------------------------------------------------------- backward
def lora_backward(
    g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset,
    need_dx, need_da, need_db, need_dbias, need_dr, deterministic, library=False,
):  # fmt: skip
    """``(dx, flat)``: dX (``x.shape``, x's dtype; empty when not needed) and the ``acc_dtype`` buffer of
    ``grad_layout`` holding dA, dB, db and dR. One launch; deterministic mode at most two. ``library``: the
    library plan's backward (dX = G W by the library GEMM, GB by an XA-mode launch, then the epilogue launch:
    two launches and one GEMM; deterministic mode three launches)."""
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    m = math.prod(x.shape[:-1])
    need_dr = need_dr and lora_R is not None
    off_da, off_db, off_dbias, off_dr, length = grad_layout(r, k, n, need_da, need_db, need_dbias, need_dr)
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dx = torch.empty(x.shape if need_dx else (0,), dtype=dtype, device=x.device)
    if m == 0 or not (need_dx or length):
        return dx, torch.zeros(length, dtype=acc, device=x.device)
    if n == 0:  # G is empty: dX = 0 and every adapter/bias gradient is an empty sum
        return dx.zero_(), torch.zeros(length, dtype=acc, device=x.device)
    gs, seq_g, sgb, sgm, sgn = rows_view(g)
    xs, seq_x, sxb, sxm, sxk = rows_view(x)
    dx2 = dx.view(m, k) if need_dx else gs
    rp = r_pad(r)
    rm = lora_R if lora_R is not None else lora_A  # any valid pointer when HAS_R is off
    key_lo, key_hi, thr, drop_scale = _dropout(dropout_p, seed)
    interpret = configs.interpreting()
    aligned = _aligned((k,), g, x, weight, lora_A, lora_B, lora_R)  # k: dX's row stride
    meta = dict(
        NEED_DX=need_dx, NEED_DA=need_da, NEED_DB=need_db, NEED_DBIAS=need_dbias, NEED_DR=need_dr,
        HAS_R=lora_R is not None, HAS_DROPOUT=dropout_p > 0, DETERMINISTIC=deterministic, PRE_GW=library,
        R_PAD=rp, IEEE=dtype == torch.float32, INTERPRET=interpret,
    )  # fmt: skip
    kind = "bwd_epi" if library else "bwd"
    gb = xa  # any valid pointer unless the library plan fills it
    db_by_launch = library and (need_db or need_dbias) and _library_db_mode() == "launch"
    if db_by_launch:
        meta.update(NEED_DB=False, NEED_DBIAS=False)

    def run(cfg, flat, stride_part, count=True):
        bm, bn, bk, group_m, num_warps, num_stages = cfg

        def seg(off):  # pointer into the gradient buffer, or any valid pointer for an unused one
            return flat[off:] if off > 0 else (flat if off == 0 else gs)

        grid = (_cdiv(m, bm) * _cdiv(k, bk),)
        _launch(
            lora_bwd_kernel, grid,
            gs, xs, weight, lora_A, lora_B, rm, xa, gb, dx2,
            seg(off_da), seg(off_db), seg(off_dbias), seg(off_dr),
            m, n, k, r, seq_g, seq_x,
            sgb, sgm, sgn, sxb, sxm, sxk, weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), rm.stride(0), rm.stride(1),
            k, 1, stride_part,
            float(scale), int(offset), key_lo, key_hi, thr, drop_scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
            count=count, **meta,
        )  # fmt: skip

    def cands():
        return configs.candidates(kind, m, rp, _DTYPE_NAMES[dtype], _capability(x), aligned, _max_shared(x))

    key = (configs.m_bucket(m), n, k, rp, dtype, lora_A.dtype, need_dx, need_da, need_db, need_dbias, need_dr,
           deterministic, dropout_p > 0, aligned, x.device.index)  # fmt: skip
    with _device_guard(x):
        if library:
            if need_dx:  # the base GEMM, written where the epilogue reads and finishes it
                torch.mm(_rows2d(g), weight, out=dx2)
                _count_library("mm")
            if need_dx or need_da or need_dr:
                gb = torch.empty((m, r), dtype=acc, device=x.device)  # GB = G B: one launch reading G once
                _reduce_rows(g, lora_B.t(), gb, r, rp, aligned, "gb")

        # tuning (opt-in) times each candidate on its own scratch buffer: atomics never touch the real sums; in
        # the library plan it also rewrites dX (G W + the LoRA term twice): tuning then runs on a scratch copy
        def bench(c):
            nonlocal dx2
            keep = dx2
            if library and need_dx:
                dx2 = dx2.clone()
            try:
                run(c, torch.zeros(length, dtype=acc, device=x.device), 0, count=False)
            finally:
                dx2 = keep

        cfg = configs.choose(kind + ("_nodb" if db_by_launch else ""), key, cands, bench)
        tiles_m = _cdiv(m, cfg[0])
        if not deterministic or tiles_m == 1 or length == 0:
            # atomics into a zeroed buffer (deterministic with one row-tile: its stores are the full sums)
            flat = torch.zeros(length, dtype=acc, device=x.device)
            run(cfg, flat, 0)
        else:
            part = torch.empty((tiles_m, length), dtype=acc, device=x.device)
            run(cfg, part[0], length)
            flat = torch.empty(length, dtype=acc, device=x.device)
            block = 4096 if interpret else 1024
            _launch(sum_partials_kernel, (_cdiv(length, block),), part, flat, tiles_m, length, length, BLOCK=block)
        if db_by_launch:  # after the sum: the partials' dB/db segments were never written, these stores replace them
            g2 = _rows2d(g)
            if need_db:
                xr_s = _xa_rt(xa, lora_R) * scale
                _reduce_rows(g2.t(), xr_s.t(), flat[off_db : off_db + n * r], r, rp, aligned, "db")
            if need_dbias:
                torch.sum(g2, dim=0, dtype=acc, out=flat[off_dbias : off_dbias + n])
                _count_library("sum")
    return dx, flat


def _library_db_mode() -> str:
    mode = os.environ.get(LIBRARY_DB_ENV, "epilogue")
    if mode not in ("epilogue", "launch"):
        raise ValueError(f"environment variable {LIBRARY_DB_ENV} must be 'epilogue' or 'launch', got {mode!r}")
    return mode


def _reduce_rows(rows, a, out, r, rp, aligned, name) -> None:
    """``out [L, r] = rows [..., L, C] @ aᵀ`` with ``a [r, C]``, accumulated in ``out``'s dtype (fp32), through the forward kernel's
    XA-only mode (a reduction over C; ``rows`` read through its strides, ``a`` cast in-kernel to ``rows``' dtype
    as the fused kernels cast the adapters; no dropout). ``out`` is row-major with row stride r. Used for GB = G B
    (rows = G, a = Bᵀ) and, in the library plan's "launch" dB mode, dB = Gᵀ (s·XA) (rows = Gᵀ, a = (s·XA)ᵀ)."""
    rs, seq, srb, srm, src = rows_view(rows)
    lm, c = math.prod(rows.shape[:-1]), rows.shape[-1]
    args = (
        rs, a, a, a, a, a, out, out,
        lm, 0, c, r, seq,
        srb, srm, src, 0, 0, a.stride(0), a.stride(1), 0, 0, 0, 0, 0, 1,
        1.0, 0, 0, 0, 0, 1.0,
    )  # fmt: skip

    def run(cfg, count=True):
        bm, bn, bk, group_m, num_warps, num_stages = cfg
        _launch(
            lora_fwd_kernel, (_cdiv(lm, bm),), *args,
            HAS_BIAS=False, HAS_DROPOUT=False, HAS_R=False, XA_MODE=2, R_PAD=rp, IEEE=rows.dtype == torch.float32,
            INTERPRET=configs.interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
            num_warps=num_warps, num_stages=num_stages, count=count,
        )  # fmt: skip

    def cands():
        return configs.candidates("fwd_xa", lm, rp, _DTYPE_NAMES[rows.dtype], _capability(rows), aligned,
                                  _max_shared(rows))  # fmt: skip

    key = (configs.m_bucket(lm), 0, c, rp, rows.dtype, a.dtype, aligned, rows.stride(-1) == 1, rows.device.index)
    run(configs.choose(name, key, cands, lambda cfg: run(cfg, count=False)))
