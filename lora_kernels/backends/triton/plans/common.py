"""Launchers shared by the plans: the rank-r row reduction (kernels/xa.py) and the backward kernel
(kernels/backward.py) with its gradient buffer, atomic or deterministic.

Config kinds (configs.py): ``fwd_xa`` for every xa launch, ``bwd`` for the one-launch backward, ``bwd_epi`` for
the library plan's epilogue. The names given to :func:`configs.choose` (``fwd2``, ``gb``, ``db``, ``bwd``,
``bwd_epi``) key the per-process config cache and :func:`configs.override`.
"""

from __future__ import annotations

import math

import torch

from ...opdef import acc_dtype, grad_layout
from .. import configs, launch
from ..kernels.backward import lora_bwd_kernel, sum_partials_kernel
from ..kernels.gemm import lora_fwd_kernel
from ..kernels.xa import lora_xa_kernel
from ..launch import DTYPE_NAMES, capability, cdiv, dropout, max_shared, r_pad, rows_view

_NO_DROPOUT = (0, 0, 0, 0, 1.0)  # offset, key_lo, key_hi, threshold, 1/(1-p): the kernels' "no dropout"


def run_xa(rows, a, out, r: int, aligned: bool, name: str, drop: tuple = (*_NO_DROPOUT, False)) -> None:
    """``out [L, r] = (rows ⊙ Z) aᵀ`` for ``rows [..., L, C]`` (read through its strides) and ``a [r, C]`` (cast
    in-kernel to rows' dtype, as the fused kernels cast the adapters), accumulated in ``out``'s dtype (fp32).
    ``out`` is row-major with row stride r. ``drop`` (:func:`dropout_tuple`) applies the dropout mask of element
    ``offset + l*C + c`` (forward XA); the default is no dropout (GB = G B, dB)."""
    rs, seq, srb, srm, src = rows_view(rows)
    lm, c = math.prod(rows.shape[:-1]), rows.shape[-1]
    has_dropout, rp = drop[5], r_pad(r)
    interpret = configs.interpreting()

    def run(cfg, count=True):
        bm, _bn, bk, _g, num_warps, num_stages = cfg
        launch.launch_kernel(
            lora_xa_kernel, (cdiv(lm, bm),), rs, a, out, lm, c, r, seq, srb, srm, src, a.stride(0), a.stride(1),
            *drop[:5], HAS_DROPOUT=has_dropout, R_PAD=rp, IEEE=rows.dtype == torch.float32, INTERPRET=interpret,
            BLOCK_M=bm, BLOCK_K=bk, num_warps=num_warps, num_stages=num_stages, count=count,
        )  # fmt: skip

    def cands():
        return configs.candidates("fwd_xa", lm, rp, DTYPE_NAMES[rows.dtype], capability(rows), aligned,
                                  max_shared(rows))  # fmt: skip

    key = (configs.m_bucket(lm), c, rp, rows.dtype, a.dtype, has_dropout, aligned, rows.stride(-1) == 1,
           rows.device.index)  # fmt: skip
    run(configs.choose(name, key, cands, lambda cfg: run(cfg, count=False)))


def run_backward(g, x, weight, lora_A, lora_B, lora_R, xa, gb, dx2, scale, drop, needs, deterministic, aligned,
                 kind: str, layout: tuple | None = None):  # fmt: skip
    """The backward kernel over ``[BM, BK]`` tiles of dX: returns the flat gradient buffer (opdef.grad_layout).

    ``needs`` = (need_dx, need_da, need_db, need_dbias, need_dr); ``drop`` = (offset, key_lo, key_hi, threshold,
    1/(1-p), has_dropout); ``layout`` = (need_da, need_db, need_dbias, need_dr) of the buffer when it holds more
    than this launch writes (the library plan's dB-by-launch mode fills dB/db afterwards). ``kind`` ``bwd``: the one-launch backward (G W and G B in its N-loop; ``gb`` unused);
    ``bwd_epi``: the library plan's epilogue (PRE_GW: ``dx2`` holds G W, ``gb`` holds G B). Atomics into a zeroed
    buffer, or (deterministic) per-row-tile partials summed in a fixed order by a second launch.
    """
    need_dx, need_da, need_db, need_dbias, need_dr = needs
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    m = math.prod(x.shape[:-1])
    off_da, off_db, off_dbias, off_dr, length = grad_layout(r, k, n, *(layout or needs[1:]))
    acc = acc_dtype(x.dtype)
    gs, seq_g, sgb, sgm, sgn = rows_view(g)
    xs, seq_x, sxb, sxm, sxk = rows_view(x)
    rp = r_pad(r)
    rm = lora_R if lora_R is not None else lora_A  # any valid pointer when HAS_R is off
    pre_gw = kind == "bwd_epi"
    meta = dict(
        NEED_DX=need_dx, NEED_DA=need_da, NEED_DB=need_db, NEED_DBIAS=need_dbias, NEED_DR=need_dr,
        HAS_R=lora_R is not None, HAS_DROPOUT=drop[5], DETERMINISTIC=deterministic, PRE_GW=pre_gw,
        R_PAD=rp, IEEE=x.dtype == torch.float32, INTERPRET=configs.interpreting(),
    )  # fmt: skip

    def run(cfg, flat, stride_part, dx_out, count=True):
        bm, bn, bk, group_m, num_warps, num_stages = cfg

        def seg(off):  # pointer into the gradient buffer, or any valid pointer for an unused one
            return flat[off:] if off > 0 else (flat if off == 0 else gs)

        launch.launch_kernel(
            lora_bwd_kernel, (cdiv(m, bm) * cdiv(k, bk),),
            gs, xs, weight, lora_A, lora_B, rm, xa, gb if gb is not None else xa, dx_out,
            seg(off_da), seg(off_db), seg(off_dbias), seg(off_dr),
            m, n, k, r, seq_g, seq_x,
            sgb, sgm, sgn, sxb, sxm, sxk, weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), rm.stride(0), rm.stride(1),
            k, 1, stride_part, float(scale), *drop[:5],
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
            count=count, **meta,
        )  # fmt: skip

    def cands():
        return configs.candidates(kind, m, rp, DTYPE_NAMES[x.dtype], capability(x), aligned, max_shared(x))

    def bench(cfg):
        # tuning times each candidate on scratch buffers: atomics never touch the real sums, and the epilogue's
        # read-modify-write of dX (G W + the LoRA term) never runs twice on the real dX
        scratch_dx = dx2.clone() if pre_gw and need_dx else dx2
        run(cfg, torch.zeros(length, dtype=acc, device=x.device), 0, scratch_dx, count=False)

    key = (configs.m_bucket(m), n, k, rp, x.dtype, lora_A.dtype, *needs, deterministic, drop[5], aligned,
           x.device.index)  # fmt: skip
    cfg = configs.choose(kind + ("_nodb" if layout is not None else ""), key, cands, bench)
    tiles_m = cdiv(m, cfg[0])
    if not deterministic or tiles_m == 1 or length == 0:
        # atomics into a zeroed buffer (deterministic with one row-tile: its stores are the full sums)
        flat = torch.zeros(length, dtype=acc, device=x.device)
        run(cfg, flat, 0, dx2)
        return flat
    part = torch.empty((tiles_m, length), dtype=acc, device=x.device)
    run(cfg, part[0], length, dx2)
    flat = torch.empty(length, dtype=acc, device=x.device)
    block = 4096 if configs.interpreting() else 1024
    launch.launch_kernel(sum_partials_kernel, (cdiv(length, block),), part, flat, tiles_m, length, length, BLOCK=block)
    return flat


def forward_outputs(x, weight, lora_A):
    """``(y, xa, ready)``: Y ``[..., N]`` in x's dtype and XA ``[M, r]`` in the accumulation dtype; ``ready`` when
    there is nothing to launch (M = 0 or N = 0)."""
    n, r = weight.shape[0], lora_A.shape[0]
    lead = x.shape[:-1]
    m = math.prod(lead)
    y = torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    xa = torch.empty((m, r), dtype=acc_dtype(x.dtype), device=x.device)
    if m and n == 0:
        xa.zero_()  # no kernel runs; XA is still defined (only dA/dB of an N=0 layer would read it)
    return y, xa, m == 0 or n == 0


def backward_outputs(g, x, weight, lora_A, lora_R, needs_in):
    """``(dx, flat, needs)``: dX (x's shape, or ``[0]`` when not needed) and, when there is nothing to launch
    (M = 0, N = 0 or nothing needed), the finished gradient buffer (else None); ``needs`` with need_dr dropped
    when there is no lora_R."""
    need_dx, need_da, need_db, need_dbias, need_dr = needs_in
    needs = (need_dx, need_da, need_db, need_dbias, need_dr and lora_R is not None)
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    m = math.prod(x.shape[:-1])
    length = grad_layout(r, k, n, *needs[1:])[-1]
    dx = torch.empty(x.shape if need_dx else (0,), dtype=x.dtype, device=x.device)
    if m == 0 or not (need_dx or length):
        return dx, torch.zeros(length, dtype=acc_dtype(x.dtype), device=x.device), needs
    if n == 0:  # G is empty: dX = 0 and every adapter/bias gradient is an empty sum
        return dx.zero_(), torch.zeros(length, dtype=acc_dtype(x.dtype), device=x.device), needs
    return dx, None, needs


def run_gemm(x, weight, bias, lora_A, lora_B, lora_R, y, xa, scale, drop, fuse_xa: bool, aligned: bool, name: str):
    """The forward GEMM (kernels/gemm.py): ``Y = X Wᵀ + b + s·XA [Rᵀ] Bᵀ``, with XA computed in its K-loop and
    stored (``fuse_xa``, the fused plan) or read from ``xa`` (split plan)."""
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    m = xa.shape[0]
    xs, seq, sxb, sxm, sxk = rows_view(x)
    rp = r_pad(r)
    rm = lora_R if lora_R is not None else lora_A  # any valid pointer when HAS_R is off
    interpret = configs.interpreting()
    args = (
        xs, weight, bias if bias is not None else weight, lora_A, lora_B, rm, y, xa,
        m, n, k, r, seq,
        sxb, sxm, sxk, weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), rm.stride(0), rm.stride(1), n, 1,
        float(scale), *drop[:5],
    )  # fmt: skip
    # without FUSE_XA the dropout mask is not drawn here (XA arrives finished): one compiled variant for both
    meta = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=drop[5] and fuse_xa, HAS_R=lora_R is not None,
                FUSE_XA=fuse_xa, R_PAD=rp, IEEE=x.dtype == torch.float32, INTERPRET=interpret)  # fmt: skip

    def run(cfg, count=True):
        bm, bn, bk, group_m, num_warps, num_stages = cfg
        launch.launch_kernel(
            lora_fwd_kernel, (cdiv(m, bm) * cdiv(n, bn),), *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages, count=count, **meta,
        )  # fmt: skip

    kind = "fwd" if fuse_xa else "fwd_gemm"

    def cands():
        return configs.candidates(kind, m, rp, DTYPE_NAMES[x.dtype], capability(x), aligned, max_shared(x))

    key = (configs.m_bucket(m), n, k, rp, x.dtype, lora_A.dtype, bias is not None, drop[5], lora_R is not None,
           aligned, x.device.index)  # fmt: skip
    run(configs.choose(name, key, cands, lambda c: run(c, count=False)))


def dropout_tuple(dropout_p: float, seed: int, offset: int) -> tuple:
    """(offset, key_lo, key_hi, threshold, 1/(1-p), has_dropout) for the kernels."""
    if dropout_p <= 0:
        return (*_NO_DROPOUT, False)
    key_lo, key_hi, thr, drop_scale = dropout(dropout_p, seed)
    return (int(offset), key_lo, key_hi, thr, drop_scale, True)
