"""The ``torch`` backend with a 4-bit frozen base (QLoRA): the oracle of every 4-bit kernel.

The base weight is a bitsandbytes NF4/FP4 weight (lora_kernels.quant.nf4.QuantWeight4bit); everything else is the
math of ``lora.py``. ``W`` never exists in full precision: the base products dequantize it per call, a chunk of
rows at a time (``quant.nf4.chunk_rows``: 4M elements by default), bit-identically to bitsandbytes, and drop the
chunk before the next::

    S   = absmax_fp32(W)                          per-block scales, dequantized once per call (N*K/blocksize)
    Y[:, rows]  = X W[rows]ᵀ                      forward, per chunk of W's rows (+ b)
    dX          = Σ_chunks G[:, rows] W[rows]     backward
    Y  += s · XA [Rᵀ] Bᵀ ;  dX += s · (G B [R] A) ⊙ Z ;  dA, dB, dR, db as in lora.py

Saved for backward: ``X``, the adapters, ``XA`` and the fp32 scales ``S`` (1/16 of W's element count at
blocksize 64); the packed codes are the layer's own (never copied). The 4-bit weight is frozen (bitsandbytes
weights cannot require grad), so there is no ``dW``. Precision: the dequantized chunk is cast once to the
activation dtype (bitsandbytes' ``dequantize_4bit`` op asked for that dtype, as bnb's forward does); the rest is
``lora.py``'s contract.
"""

from __future__ import annotations

import torch

from ...quant import nf4
from ...quant.nf4 import QuantWeight4bit, absmax_fp32, chunk_rows
from ..base import LoRAOpts
from . import native
from .lora import _as, lora_grads, lora_xa


def dequantize_rows(q: QuantWeight4bit, start: int, stop: int, dtype: torch.dtype, absmax: torch.Tensor):
    """Rows ``[start, stop)`` of W in ``dtype``: on CPU one fused native pass (unpack + code book + scale + round,
    ``lora_kernels._cpu.dequant_4bit``), else :func:`lora_kernels.quant.nf4.dequantize_rows`' torch ops; the same
    values bit for bit (tests/test_qlora_native.py). Without the native module :mod:`.native` logs why, once."""
    lib = native.module() if q.device.type == "cpu" and not torch.compiler.is_compiling() else None
    k = q.shape[1]
    if lib is None or dtype not in _NATIVE_DTYPES or absmax.dtype != torch.float32 or start >= stop or k == 0:
        return nf4.dequantize_rows(q, start, stop, dtype, absmax)
    out = torch.empty((stop - start, k), dtype=dtype)
    code = q.code.float().contiguous()  # 16 values
    packed, absmax = q.packed.contiguous(), absmax.contiguous()  # no copies: both are flat and contiguous already
    lib.dequant_4bit(packed.data_ptr(), code.data_ptr(), absmax.data_ptr(), out.data_ptr(), start * k, stop * k,
                     q.blocksize, native.DTYPE_CODES[dtype], torch.get_num_threads())  # fmt: skip
    return out


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def base_forward(x2: torch.Tensor, q: QuantWeight4bit, absmax: torch.Tensor, bias) -> torch.Tensor:
    """``X Wᵀ (+ b)`` ``[M, N]`` in x's dtype, dequantizing W a chunk of rows at a time."""
    m, n = x2.shape[0], q.shape[0]
    step = chunk_rows(q)
    if step >= n:
        w = dequantize_rows(q, 0, n, x2.dtype, absmax)
        return torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        w = dequantize_rows(q, n0, n1, x2.dtype, absmax)
        if bias is not None:
            y[:, n0:n1] = torch.addmm(bias[n0:n1], x2, w.t())
        else:
            y[:, n0:n1] = x2 @ w.t()
    return y


def base_grad_input(g: torch.Tensor, q: QuantWeight4bit, absmax: torch.Tensor) -> torch.Tensor:
    """``G W`` ``[M, K]`` in g's dtype, accumulated over chunks of W's rows."""
    n = q.shape[0]
    step = chunk_rows(q)
    dx = None
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        w = dequantize_rows(q, n0, n1, g.dtype, absmax)
        gc = g if (n0 == 0 and n1 == n) else g[:, n0:n1]
        dx = gc @ w if dx is None else dx.addmm_(gc, w)
    if dx is None:  # N = 0
        dx = g.new_zeros((g.shape[0], q.shape[1]))
    return dx


class _TorchQLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, lora_R, q: QuantWeight4bit, opts: LoRAOpts):
        k, n = x.shape[-1], q.shape[0]
        x2 = x.reshape(-1, k)
        dt = x.dtype
        absmax = absmax_fp32(q)
        xa32, xr = lora_xa(x2, lora_A, lora_R, opts)  # the dense path's, bit for bit
        y = base_forward(x2, q, absmax, bias)
        y.addmm_(xr, _as(lora_B, dt).t(), alpha=opts.scale)
        # the 4-bit weight and the options are frozen, non-differentiable state: on ctx, not saved tensors
        ctx.q, ctx.opts, ctx.x_shape = q, opts, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x2, lora_A, lora_B, lora_R, xa32, absmax)
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y):
        x2, lora_A, lora_B, lora_R, xa32, absmax = ctx.saved_tensors
        opts: LoRAOpts = ctx.opts
        need_x, need_b, need_a, need_bb, need_r, _, _ = ctx.needs_input_grad
        q: QuantWeight4bit = ctx.q
        g = grad_y.reshape(-1, q.shape[0])
        dx = base_grad_input(g, q, absmax) if need_x else None
        dx, da, dbb, dr = lora_grads(g, x2, lora_A, lora_B, lora_R, xa32, opts, dx, need_a, need_bb, need_r)
        if need_x:
            dx = dx.view(ctx.x_shape)
        db = g.sum(0).to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return dx, db, da, dbb, dr, None, None


def apply_4bit(x, weight: QuantWeight4bit, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> torch.Tensor:
    return _TorchQLoRALinear.apply(x, bias, lora_A, lora_B, lora_R, weight, opts)
