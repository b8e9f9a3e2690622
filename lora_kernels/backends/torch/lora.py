"""The ``torch`` backend: the fused LoRA linear in plain PyTorch. CPU path, fallback and test oracle.

Math (DESIGN.md), with ``X: [M, K]``, ``W: [N, K]``, ``A: [r, K]``, ``B: [N, r]``, optional middle ``R: [r, r]``
(the subspace method of issue 8; absent = identity)::

    Xd = X ⊙ Z                      Z regenerated from (seed, offset) by lora_kernels.backends.mask, never stored
    XA = Xd Aᵀ                      [M, r]   saved for backward (tiny)
    XR = XA Rᵀ                      [M, r]   (= XA without R)
    Y  = X Wᵀ + b + s · XR Bᵀ       two BLAS calls: addmm for the base, addmm_ (alpha=s) for the LoRA term

Backward with ``G = dY``::

    GB  = G B                       [M, r]
    GBR = GB R                      [M, r]   (= GB without R)
    dX  = G W + s · (GBR A) ⊙ Z     mm + addmm_ (dropout off) or mm + masked add (dropout on)
    dA  = s · GBRᵀ Xd               Xd regenerated from the seed
    dB  = s · Gᵀ XR
    dR  = s · GBᵀ XA
    db  = Σ_rows G ;  dW = Gᵀ X     only when they require grad (full fine-tuning)

Saved tensors: ``X`` (the input itself, or its 2-D view), the parameters (no copies) and ``XA``; never a
second ``M x K`` tensor. Each gradient is computed only when ``ctx.needs_input_grad`` asks for it.

Precision contract (shared by every backend; kernels may be more precise, never less): every GEMM takes its
operands in the activation dtype — fp32 adapters and the fp32 intermediates ``XA``/``GB`` are rounded to it at the
operand, exactly what a bf16/fp16 tensor-core MMA sees — and accumulates in fp32. ``XA``, ``GB`` and the adapter
gradients are produced in fp32 (then cast to the adapter dtype); ``Y`` and ``dX`` are stored in the activation dtype.
"""

from __future__ import annotations

import torch

from ..base import LoRAOpts
from ..mask import apply_dropout, dropout_keep_mask


def supports(x, weight, bias, lora_A, lora_B, lora_R, opts) -> tuple[bool, str]:
    return True, "pure PyTorch handles every device, dtype and rank"


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and an fp32 (or fp64) result, for operands of one dtype.

    CUDA has ``torch.mm(..., out_dtype=float32)`` for bf16/fp16 operands (no upcast copies); elsewhere the operands
    are upcast, which is exact (every bf16/fp16 value is an fp32 value), so the numerics match a tensor-core MMA.
    """
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: no out_dtype overload
            pass
    return a.float() @ b.float()


def _dropped(x2: torch.Tensor, opts: LoRAOpts) -> torch.Tensor:
    return apply_dropout(x2, opts.seed, opts.offset, opts.dropout_p) if opts.dropout_p > 0 else x2


class _TorchLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        dt = x.dtype
        a = lora_A.to(dt)
        b_ = lora_B.to(dt)
        xa32 = _mm32(_dropped(x2, opts), a.t())  # [M, r] fp32
        xr = xa32.to(dt) if lora_R is None else _mm32(xa32.to(dt), lora_R.to(dt).t()).to(dt)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(xr, b_.t(), alpha=opts.scale)
        ctx.opts = opts
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, weight, bias, lora_A, lora_B, lora_R, xa32)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, bias, lora_A, lora_B, lora_R, xa32 = ctx.saved_tensors
        opts: LoRAOpts = ctx.opts
        need_x, need_w, need_b, need_a, need_bb, need_r, _ = ctx.needs_input_grad
        n = weight.shape[0]
        dt = x2.dtype
        s = opts.scale
        g = grad_y.reshape(-1, n)
        a = lora_A.to(dt)
        b_ = lora_B.to(dt)
        r_ = None if lora_R is None else lora_R.to(dt)
        xa = xa32.to(dt)

        dx = dw = db = da = dbb = dr = None
        gb = gbr = None
        if need_x or need_a or need_r:
            gb = _mm32(g, b_).to(dt)  # [M, r], fp32 accumulation, operand-rounded like an MMA input
            gbr = gb if r_ is None else _mm32(gb, r_).to(dt)
        keep = None  # the forward's mask, regenerated once and shared by dX and dA
        if opts.dropout_p > 0 and (need_x or need_a):
            keep = dropout_keep_mask(opts.seed, opts.offset, x2.shape[0], x2.shape[1], opts.dropout_p, x2.device)
        if need_x:
            dx = g @ weight
            if keep is not None:
                t = gbr @ a
                t.mul_(keep)
                dx.add_(t, alpha=s / (1.0 - opts.dropout_p))
            else:
                dx.addmm_(gbr, a, alpha=s)
            dx = dx.view(ctx.x_shape)
        if need_w:
            dw = (g.t() @ x2).to(weight.dtype)
        if need_b and bias is not None:
            db = g.sum(0).to(bias.dtype)
        if need_a:
            xd = x2 if keep is None else apply_dropout(x2, opts.seed, opts.offset, opts.dropout_p, keep)
            da = _mm32(gbr.t(), xd).mul_(s).to(lora_A.dtype)
        if need_bb:
            xr = xa if r_ is None else _mm32(xa, r_.t()).to(dt)
            dbb = _mm32(g.t(), xr).mul_(s).to(lora_B.dtype)
        if need_r and lora_R is not None:
            dr = _mm32(gb.t(), xa).mul_(s).to(lora_R.dtype)
        return dx, dw, db, da, dbb, dr, None


def apply(x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> torch.Tensor:
    return _TorchLoRALinear.apply(x, weight, bias, lora_A, lora_B, lora_R, opts)
