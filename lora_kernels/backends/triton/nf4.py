"""The Triton backend on a 4-bit frozen base (QLoRA): the library plan with its two big GEMMs replaced by the
4-bit GEMM of ``nf4_kernels.py`` (W dequantized tile by tile in registers, never stored in full precision).

Forward (2 launches; +1 library ``mm`` for ``XA Rᵀ`` with lora_R)::

    XA = dropout(X) Aᵀ                     kernels/xa.py (mask fused, never stored)
    Y  = X Wᵀ + b + s·(XA [Rᵀ]) Bᵀ         nf4_gemm_kernel with the LoRA epilogue

Backward (3 launches; 4 deterministic)::

    dX  = G W                              nf4_gemm_kernel, W read as [N, K] (flat strides (1, K))
    GB  = G B                              kernels/xa.py on (G, Bᵀ)
    dX += s·(GB [R] A) ⊙ Z ; dA, dB, db, dR     kernels/backward.py with PRE_GW (the library plan's epilogue)

The per-block scales are dequantized once per forward on the host when the weight is double-quantized (N*K /
blocksize values; lora_kernels.quant.nf4.absmax_fp32, bit-identical to bitsandbytes) and saved for the backward;
the packed codes are the layer's own. Eager only: a plain ``autograd.Function`` (the 4-bit weight is not a
tensor argument of the registered custom op, so torch.compile does not trace this path).
"""

from __future__ import annotations

import torch

from ...quant.nf4 import QuantWeight4bit, absmax_fp32
from ..base import LoRAOpts
from ..opdef import grad_layout
from . import configs, launch
from .launch import DTYPE_NAMES, aligned, capability, cdiv, device_guard, max_shared, r_pad, rows_view, xa_rt
from .nf4_kernels import nf4_gemm_kernel
from .plans.common import backward_outputs, dropout_tuple, forward_outputs, run_backward, run_xa


def supports_4bit(x, weight: QuantWeight4bit, bias, lora_A, lora_B, lora_R, opts) -> tuple[bool, str]:
    return True, f"triton 4-bit GEMM ({weight.quant_type}, dequantized in registers) + the library plan's LoRA kernels"


def run_gemm_4bit(a, q: QuantWeight4bit, absmax, out2, transpose_w: bool, ok: bool, name: str,
                  bias=None, xr=None, lora_B=None, scale: float = 0.0) -> None:  # fmt: skip
    """``out2 [M, P] = a op(W) (+ b + s·xr Bᵀ)``: ``op(W) = Wᵀ`` (``transpose_w``, forward: P = N) or ``W``
    (backward dX: P = K). ``a [..., Q]`` is read through its strides."""
    n, k = q.shape
    p, qd = (n, k) if transpose_w else (k, n)
    stride_wp, stride_wq = (k, 1) if transpose_w else (1, k)
    rs, seq, sab, sam, saq = rows_view(a)
    m = out2.shape[0]
    has_lora = xr is not None
    r = lora_B.shape[1] if has_lora else 1
    rp = r_pad(r)
    anyp = q.packed  # any valid pointer for an unused argument
    args = (rs, q.packed, q.code, absmax, out2, bias if bias is not None else anyp, xr if has_lora else absmax,
            lora_B if has_lora else anyp, m, p, qd, r, seq, sab, sam, saq, stride_wp, stride_wq,
            lora_B.stride(0) if has_lora else 0, lora_B.stride(1) if has_lora else 0, out2.stride(0),
            float(scale))  # fmt: skip
    meta = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, BLOCKSIZE=q.blocksize, R_PAD=rp,
                IEEE=a.dtype == torch.float32, INTERPRET=configs.interpreting())  # fmt: skip

    def run(cfg, count=True):
        bm, bn, bk, group_m, num_warps, num_stages = cfg
        launch.launch_kernel(nf4_gemm_kernel, (cdiv(m, bm) * cdiv(p, bn),), *args, BLOCK_M=bm, BLOCK_N=bn,
                             BLOCK_K=bk, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages, count=count,
                             **meta)  # fmt: skip

    def cands():  # the split plan's GEMM rows (no [BM, R_PAD] accumulator in the K loop): untuned for 4-bit
        return configs.candidates("fwd_gemm", m, rp, DTYPE_NAMES[a.dtype], capability(a), ok, max_shared(a))

    key = (configs.m_bucket(m), p, qd, rp, a.dtype, q.blocksize, bias is not None, has_lora, ok, a.device.index)
    run(configs.choose(name, key, cands, lambda c: run(c, count=False)))


def forward(x, q: QuantWeight4bit, absmax, bias, lora_A, lora_B, lora_R, opts: LoRAOpts):
    y, xa, ready = forward_outputs(x, q, lora_A)
    if ready:
        return y, xa
    n = q.shape[0]
    ok = aligned((n,), x, lora_A, lora_B, lora_R)
    with device_guard(x):
        run_xa(x, lora_A, xa, lora_A.shape[0], ok, "nf4_xa", dropout_tuple(opts.dropout_p, opts.seed, opts.offset))
        run_gemm_4bit(x, q, absmax, y.view(-1, n), True, ok, "nf4_fwd", bias, xa_rt(xa, lora_R), lora_B, opts.scale)
    return y, xa


def backward(g, x, q: QuantWeight4bit, absmax, lora_A, lora_B, lora_R, xa, opts: LoRAOpts, needs, deterministic):
    """``(dx, flat)`` as the plans return them; ``needs`` = (need_dx, need_da, need_db, need_dbias, need_dr)."""
    dx, flat, needs = backward_outputs(g, x, q, lora_A, lora_R, needs)
    if flat is not None:
        return dx, flat
    (n, k), r, m = q.shape, lora_A.shape[0], xa.shape[0]
    dx2 = dx.view(m, k) if needs[0] else g  # any valid pointer when dX is not needed
    ok = aligned((k,), g, x, lora_A, lora_B, lora_R)
    # the epilogue takes a weight only for its sizes and (unused under PRE_GW) pointer: a zero-stride stand-in
    w_sizes = x.new_empty((1, 1)).expand(n, k)
    with device_guard(x):
        if needs[0]:
            run_gemm_4bit(g, q, absmax, dx2, False, ok, "nf4_dx")
        gb = None
        if needs[0] or needs[1] or needs[4]:
            gb = torch.empty((m, r), dtype=torch.float32, device=x.device)
            run_xa(g, lora_B.t(), gb, r, ok, "nf4_gb")
        flat = run_backward(g, x, w_sizes, lora_A, lora_B, lora_R, xa, gb, dx2, opts.scale,
                            dropout_tuple(opts.dropout_p, opts.seed, opts.offset), needs, deterministic, ok,
                            "bwd_epi")  # fmt: skip
    return dx, flat


class _TritonQLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, lora_R, q: QuantWeight4bit, opts: LoRAOpts):
        absmax = absmax_fp32(q)
        y, xa = forward(x, q, absmax, bias, lora_A, lora_B, lora_R, opts)
        # the frozen 4-bit weight and the options are non-differentiable state: on ctx, not saved tensors
        ctx.q, ctx.opts = q, opts
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, lora_A, lora_B, lora_R, xa, absmax)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, lora_R, xa, absmax = ctx.saved_tensors
        need_dx, need_dbias, need_da, need_db, need_dr = ctx.needs_input_grad[:5]
        need_dbias = need_dbias and ctx.bias_dtype is not None
        need_dr = need_dr and lora_R is not None
        opts: LoRAOpts = ctx.opts
        dx, flat = backward(grad_y, x, ctx.q, absmax, lora_A, lora_B, lora_R, xa, opts,
                            (need_dx, need_da, need_db, need_dbias, need_dr), opts.deterministic)  # fmt: skip
        r, k, n = lora_A.shape[0], x.shape[-1], ctx.q.shape[0]
        off_da, off_db, off_dbias, off_dr, _ = grad_layout(r, k, n, need_da, need_db, need_dbias, need_dr)
        da = flat[off_da : off_da + r * k].view(r, k).to(lora_A.dtype) if need_da else None
        db = flat[off_db : off_db + n * r].view(n, r).to(lora_B.dtype) if need_db else None
        dbias = flat[off_dbias : off_dbias + n].to(ctx.bias_dtype) if need_dbias else None
        dr = flat[off_dr : off_dr + r * r].view(r, r).to(lora_R.dtype) if need_dr else None
        return (dx if need_dx else None), dbias, da, db, dr, None, None


def apply_4bit(x, weight: QuantWeight4bit, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> torch.Tensor:
    return _TritonQLoRALinear.apply(x, bias, lora_A, lora_B, lora_R, weight, opts)
