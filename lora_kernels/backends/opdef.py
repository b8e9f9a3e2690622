"""One op contract for every kernel backend: ``torch.library`` schema, fake and autograd, defined once.

A kernel backend (triton, cuda, or one from outside the package) supplies a :class:`Kernels` object — how to pick
a plan, how to run the forward and the backward — and :func:`define_lora_op` turns it into two custom ops::

    lora_kernels::<name>_lora_fwd(x, weight, bias?, A, B, R?, scale, p, seed, offset, deterministic, plan)
        -> (y [..., N] in x's dtype, xa [M, r] in acc_dtype)
    lora_kernels::<name>_lora_bwd(g, x, weight, A, B, R?, xa, scale, p, seed, offset,
                                  need_dx, need_da, need_db, need_dbias, need_dr, deterministic, plan)
        -> (dx: x's shape, or [0] when not needed;  flat: acc_dtype buffer of grad_layout(...))

with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces them, and the autograd formula on
the forward op. ``plan`` is resolved before the op is called (``"auto"`` is resolved by the backend) and the
backward always runs the plan its forward ran. The adapter and bias gradients come back as one flat buffer
(custom ops return a fixed number of tensors; views of one buffer would alias); the formula splits it into views
and casts each to its parameter's dtype (a no-op for fp32 adapters). A trainable base weight gets ``dW = Gᵀ X``
from a library GEMM (DESIGN.md allows it; full fine-tuning is outside the fused launch budget).

Eager calls skip the custom-op layer (its Python dispatch costs ~50-100 us per call, NOTES.md "Host overhead"):
:meth:`LoRAOp.apply` runs a plain ``autograd.Function`` with the same formulas unless torch.compile is tracing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .base import LoRAOpts


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: the dtype of XA and of the flat gradient buffer."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_layout(r: int, k: int, n: int, need_da: bool, need_db: bool, need_dbias: bool, need_dr: bool = False):
    """``(off_dA, off_dB, off_db, off_dR, length)``: where dA [r, K], dB [N, r], db [N] and dR [r, r] (row-major)
    sit in the flat gradient buffer (-1: not computed), and the buffer's length."""
    off, out = 0, []
    for need, size in ((need_da, r * k), (need_db, n * r), (need_dbias, n), (need_dr, r * r)):
        out.append(off if need else -1)
        off += size if need else 0
    return (*out, off)


class Kernels(Protocol):
    """What a kernel backend provides. Inputs arrive validated (lora_kernels.functional.validate)."""

    def resolve_plan(self, plan: str, m: int, dropout_p: float) -> str:
        """The concrete plan for one call of ``m`` rows (``plan`` may be ``"auto"``)."""

    def forward(self, x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, plan):
        """``(y, xa)``."""

    def backward(self, g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset,
                 need_dx, need_da, need_db, need_dbias, need_dr, deterministic, plan):  # fmt: skip
        """``(dx, flat)``."""


@dataclass
class LoRAOp:
    """The two custom ops of one backend and its eager fast path."""

    name: str
    fwd: object  # torch.library CustomOpDef
    bwd: object
    kernels: Kernels
    function: type  # the eager autograd.Function

    def apply(self, x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts, plan: str = "auto") -> Tensor:
        """``y``: through the custom op while torch.compile traces, else through the eager Function."""
        plan = self.kernels.resolve_plan(plan, math.prod(x.shape[:-1]), opts.dropout_p)
        args = (x, weight, bias, lora_A, lora_B, lora_R, opts.scale, opts.dropout_p, opts.seed, opts.offset,
                opts.deterministic, plan)  # fmt: skip
        if torch.compiler.is_compiling():
            return self.fwd(*args)[0]
        return self.function.apply(*args)[0]


def _split_grads(ctx, flat, dx, grad_y, x, weight, lora_A, lora_B, lora_R, needs):
    need_dx, need_dw, need_dbias, need_da, need_db, need_dr = needs
    r, k, n = lora_A.shape[0], x.shape[-1], weight.shape[0]
    off_da, off_db, off_dbias, off_dr, _ = grad_layout(r, k, n, need_da, need_db, need_dbias, need_dr)
    da = flat[off_da : off_da + r * k].view(r, k).to(lora_A.dtype) if need_da else None
    db = flat[off_db : off_db + n * r].view(n, r).to(lora_B.dtype) if need_db else None
    dbias = flat[off_dbias : off_dbias + n].to(ctx.bias_dtype) if need_dbias else None
    dr = flat[off_dr : off_dr + r * r].view(r, r).to(lora_R.dtype) if need_dr else None
    dw = None
    if need_dw:  # full fine-tuning: a library GEMM (DESIGN.md), not part of the fused launch budget
        dw = (grad_y.reshape(-1, n).t() @ x.reshape(-1, k)).to(weight.dtype)
    return (dx if need_dx else None), dw, dbias, da, db, dr


def define_lora_op(name: str, kernels: Kernels) -> LoRAOp:
    """Register ``lora_kernels::<name>_lora_fwd`` / ``_bwd`` for ``kernels`` and return them as a :class:`LoRAOp`.

    Call once per backend, at import of its ops module (torch.library refuses a second definition).
    """

    def fwd_impl(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 lora_R: Tensor | None, scale: float, dropout_p: float, seed: int, offset: int, deterministic: bool,
                 plan: str = "auto") -> tuple[Tensor, Tensor]:  # fmt: skip
        # `deterministic` is unused here; it rides along so the autograd formula sees it without hidden state.
        plan = kernels.resolve_plan(plan, math.prod(x.shape[:-1]), dropout_p)
        return kernels.forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, plan)

    def bwd_impl(g: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_R: Tensor | None,
                 xa: Tensor, scale: float, dropout_p: float, seed: int, offset: int, need_dx: bool, need_da: bool,
                 need_db: bool, need_dbias: bool, need_dr: bool, deterministic: bool,
                 plan: str = "auto") -> tuple[Tensor, Tensor]:  # fmt: skip
        plan = kernels.resolve_plan(plan, math.prod(x.shape[:-1]), dropout_p)
        return kernels.backward(g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset,
                                need_dx, need_da, need_db, need_dbias, need_dr, deterministic, plan)  # fmt: skip

    fwd = torch.library.custom_op(f"lora_kernels::{name}_lora_fwd", mutates_args=())(fwd_impl)
    bwd = torch.library.custom_op(f"lora_kernels::{name}_lora_bwd", mutates_args=())(bwd_impl)

    @fwd.register_fake
    def _(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic, plan="auto"):
        m = math.prod(x.shape[:-1])
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))
        return y, x.new_empty((m, lora_A.shape[0]), dtype=acc_dtype(x.dtype))

    @bwd.register_fake
    def _(g, x, weight, lora_A, lora_B, lora_R, xa, scale, p, seed, offset, need_dx, need_da, need_db, need_dbias,
          need_dr, deterministic, plan="auto"):  # fmt: skip
        need_dr = need_dr and lora_R is not None
        r, k, n = lora_A.shape[0], x.shape[-1], weight.shape[0]
        length = grad_layout(r, k, n, need_da, need_db, need_dbias, need_dr)[-1]
        dx = x.new_empty(x.shape if need_dx else (0,))
        return dx, x.new_empty((length,), dtype=acc_dtype(x.dtype))

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic, *rest = inputs
        ctx.save_for_backward(x, weight, lora_A, lora_B, lora_R, output[1])
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.scalars = (scale, dropout_p, seed, offset)
        ctx.deterministic = deterministic
        ctx.plan = kernels.resolve_plan(rest[0] if rest else "auto", math.prod(x.shape[:-1]), dropout_p)

    def backward(ctx, grad_y, grad_xa, run_bwd=bwd):
        x, weight, lora_A, lora_B, lora_R, xa = ctx.saved_tensors
        need_dx, need_dw, need_dbias, need_da, need_db, need_dr = ctx.needs_input_grad[:6]
        needs = (need_dx, need_dw, need_dbias and ctx.bias_dtype is not None, need_da, need_db,
                 need_dr and lora_R is not None)  # fmt: skip
        if grad_y is None:
            grad_y = x.new_zeros((*x.shape[:-1], weight.shape[0]))
        dx, flat = run_bwd(grad_y, x, weight, lora_A, lora_B, lora_R, xa, *ctx.scalars, need_dx, need_da, need_db,
                           needs[2], needs[5], ctx.deterministic, ctx.plan)  # fmt: skip
        grads = _split_grads(ctx, flat, dx, grad_y, x, weight, lora_A, lora_B, lora_R, needs)
        return (*grads, None, None, None, None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)

    class Function(torch.autograd.Function):
        """The eager path: the kernels called directly, with the custom op's autograd formula."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic,
                    plan):  # fmt: skip
            y, xa = kernels.forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, plan)
            setup_context(ctx, (x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset,
                                deterministic, plan), (y, xa))  # fmt: skip
            ctx.mark_non_differentiable(xa)
            return y, xa

        @staticmethod
        def backward(ctx, grad_y, grad_xa):
            return backward(ctx, grad_y, grad_xa, run_bwd=kernels.backward)

    Function.__name__ = Function.__qualname__ = f"{name.capitalize()}LoRAFunction"
    return LoRAOp(name, fwd, bwd, kernels, Function)
