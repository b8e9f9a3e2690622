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
second ``M x K`` tensor. Each gradient is computed only when ``ctx.needs_input_grad`` asks for it. With dropout the
masked products run row chunk by row chunk (:mod:`.dropout`): ``X ⊙ Z`` exists one cached chunk at a time, and in
backward one mask evaluation per chunk serves both ``dX`` and ``dA`` (on CPU one fused native pass, :mod:`.native`).

Host time matters at small shapes (a LoRA layer of a small model is a few microseconds of math): no ``.to()`` /
``.reshape()`` / ``.view()`` call is made when it would be a no-op and a scaled product is one ``addmm`` (``beta=0``,
``alpha=s``) rather than ``mm`` + ``mul_``. Measured at M=4, 64->64 (README, CPU results), this ``Function`` is faster
than the same formulas as ATen ops under autograd: the engine's ``alpha`` and scalar multiplies cost more than the
Python ``backward``.

Precision contract (shared by every backend; kernels may be more precise, never less): every GEMM takes its
operands in the activation dtype — fp32 adapters and the fp32 intermediates ``XA``/``GB`` are rounded to it at the
operand, exactly what a bf16/fp16 tensor-core MMA sees — and accumulates in fp32. ``XA``, ``GB`` and the adapter
gradients are produced in fp32 (then cast to the adapter dtype); ``Y`` and ``dX`` are stored in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import LoRAOpts
from .dropout import dropped_backward, dropped_xa, scaled_mm

_EXACT = (torch.float32, torch.float64)


def supports(x, weight, bias, lora_A, lora_B, lora_R, opts) -> tuple[bool, str]:
    return True, "pure PyTorch handles every device, dtype and rank"


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and an fp32 (or fp64) result, for operands of one dtype.

    CUDA has ``torch.mm(..., out_dtype=float32)`` for bf16/fp16 operands (no upcast copies); elsewhere the operands
    are upcast, which is exact (every bf16/fp16 value is an fp32 value), so the numerics match a tensor-core MMA.
    """
    if a.dtype in _EXACT:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: no out_dtype overload
            pass
    return torch.mm(a.float(), b.float())


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled_mm32(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s · (a @ b)`` as :func:`_mm32` computes it (fp32/fp64 result), with ``s`` applied by the GEMM."""
    if a.dtype in _EXACT:
        return scaled_mm(a, b, s)
    if a.is_cuda:
        return _mm32(a, b).mul_(s)
    return scaled_mm(a.float(), b.float(), s)  # the upcast _mm32 makes, with the scale in the GEMM


def lora_xa(x2, lora_A, lora_R, opts: LoRAOpts) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's rank-r product: ``XA = dropout(X) Aᵀ`` ``[M, r]`` in the accumulation dtype (saved for
    backward) and ``XR`` (``XA Rᵀ``, or XA) in the activation dtype, the operand of the LoRA term."""
    dt = x2.dtype
    a = _as(lora_A, dt)
    p = opts.dropout_p
    if p > 0:
        xa32 = dropped_xa(x2, a, opts.seed, opts.offset, p)  # [M, r] fp32 (fp64 for fp64)
    else:
        xa32 = F.linear(x2, a) if dt in _EXACT else _mm32(x2, a.t())
    xr = _as(xa32, dt) if lora_R is None else _as(_mm32(_as(xa32, dt), _as(lora_R, dt).t()), dt)
    return xa32, xr


def lora_grads(g, x2, lora_A, lora_B, lora_R, xa32, opts: LoRAOpts, dx, need_a, need_bb, need_r):
    """The LoRA term's backward, shared by every torch-path base (dense, 4-bit): adds ``s · (GBR A) ⊙ Z`` into
    ``dx`` (``[M, K]`` holding the base's ``G W``, or None) and returns ``(dx, dA, dB, dR)`` (None where not needed)."""
    dt = x2.dtype
    s, p = opts.scale, opts.dropout_p
    need_x = dx is not None
    a = _as(lora_A, dt)
    r_ = None if lora_R is None else _as(lora_R, dt)
    da = dbb = dr = None
    gb = gbr = None
    if need_x or need_a or need_r:
        gb = _as(_mm32(g, _as(lora_B, dt)), dt)  # [M, r], fp32 accumulation, operand-rounded like an MMA input
        gbr = gb if r_ is None else _as(_mm32(gb, r_), dt)
    if p > 0 and (need_x or need_a):
        # dX += s/(1-p)·(GBR A) ⊙ Z and dA = s·GBRᵀ (X ⊙ Z)/(1-p): the forward's mask, regenerated once per chunk
        da32 = dropped_backward(x2, gbr, a, dx, need_a, s, opts.seed, opts.offset, p)
        da = _as(da32, lora_A.dtype) if need_a else None
    else:
        if need_x:
            dx.addmm_(gbr, a, alpha=s)
        if need_a:
            da = _as(_scaled_mm32(gbr.t(), x2, s), lora_A.dtype)
    if need_bb:
        xa = _as(xa32, dt)
        xr = xa if r_ is None else _as(_mm32(xa, r_.t()), dt)
        dbb = _as(_scaled_mm32(g.t(), xr, s), lora_B.dtype)
    if need_r and lora_R is not None:
        dr = _as(_scaled_mm32(gb.t(), _as(xa32, dt), s), lora_R.dtype)
    return dx, da, dbb, dr


class _TorchLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts):
        k = x.shape[-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        xa32, xr = lora_xa(x2, lora_A, lora_R, opts)
        y = F.linear(x2, weight, bias)  # addmm / mm on Wᵀ, without a Python-level transpose
        y.addmm_(xr, _as(lora_B, x.dtype).t(), alpha=opts.scale)
        ctx.opts = opts
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        if lora_R is None:
            ctx.save_for_backward(x2, weight, lora_A, lora_B, xa32)
        else:
            ctx.save_for_backward(x2, weight, lora_A, lora_B, xa32, lora_R)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, xa32, *rest = ctx.saved_tensors
        lora_R = rest[0] if rest else None
        opts: LoRAOpts = ctx.opts
        need_x, need_w, need_b, need_a, need_bb, need_r, _ = ctx.needs_input_grad
        g = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, weight.shape[0])
        dx = torch.mm(g, weight) if need_x else None
        dx, da, dbb, dr = lora_grads(g, x2, lora_A, lora_B, lora_R, xa32, opts, dx, need_a, need_bb, need_r)
        if need_x and dx.shape != ctx.x_shape:
            dx = dx.view(ctx.x_shape)
        dw = _as(torch.mm(g.t(), x2), weight.dtype) if need_w else None
        db = _as(g.sum(0), ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return dx, dw, db, da, dbb, dr, None


def apply(x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> torch.Tensor:
    return _TorchLoRALinear.apply(x, weight, bias, lora_A, lora_B, lora_R, opts)
