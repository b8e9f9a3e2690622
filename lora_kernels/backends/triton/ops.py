"""``torch.library`` custom ops around the launchers, so ``torch.compile`` traces through the triton backend.

    lora_kernels::triton_lora_fwd(x, weight, bias?, A, B, R?, scale, p, seed, offset, deterministic) -> (y, xa)
    lora_kernels::triton_lora_bwd(g, x, weight, A, B, R?, xa, scale, p, seed, offset, needs..., det) -> (dx, flat)

Both have fake (meta) implementations; autograd is registered on the forward op. The backward op returns the
adapter/bias gradients as one flat fp32 buffer (launch.grad_layout); the autograd formula splits it into views
and casts to each parameter's dtype (a no-op for fp32 adapters). A trainable base weight gets
``dW = Gᵀ X`` from a library GEMM (torch.mm), as DESIGN.md allows.

The forward plan (fused/split/library) is read at call time from lora_kernels.backends.triton.get_forward_plan(); it
changes the number of launches, not the result's meaning (the plans round XA identically). The backward follows
the plan its forward resolved to (``library`` -> the library backward, else the one-launch backward).

Eager calls skip the custom-op layer: :func:`lora_apply` runs :class:`LoRAFunction` (a plain
``autograd.Function`` with the same forward/backward formulas) unless ``torch.compile`` is tracing. The
custom op's Python dispatch (schema checks, autograd wrapper, redispatch) cost ~50-100 us per forward on this
CPU (NOTES.md, "Host overhead") while a decode-size GPU forward's GEMM is ~20 us of device time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import launch


@torch.library.custom_op("lora_kernels::triton_lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_R: Tensor | None,
    scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    # `deterministic` is unused here; it rides along so the autograd formula sees it without hidden state.
    return launch.lora_forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset)


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic):
    m = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty((m, lora_A.shape[0]), dtype=launch.acc_dtype(x.dtype))


@torch.library.custom_op("lora_kernels::triton_lora_bwd", mutates_args=())
def lora_bwd(
    g: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_R: Tensor | None,
    xa: Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    need_dbias: bool,
    need_dr: bool,
    deterministic: bool,
    library: bool = False,
) -> tuple[Tensor, Tensor]:
    return launch.lora_backward(
        g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset,
        need_dx, need_da, need_db, need_dbias, need_dr, deterministic, library,
    )  # fmt: skip


@lora_bwd.register_fake
def _(
    g,
    x,
    weight,
    lora_A,
    lora_B,
    lora_R,
    xa,
    scale,
    p,
    seed,
    offset,
    need_dx,
    need_da,
    need_db,
    need_dbias,
    need_dr,
    det,
    library=False,
):
    need_dr = need_dr and lora_R is not None
    r, k, n = lora_A.shape[0], x.shape[-1], weight.shape[0]
    length = launch.grad_layout(r, k, n, need_da, need_db, need_dbias, need_dr)[-1]
    dx = x.new_empty(x.shape if need_dx else (0,))
    return dx, x.new_empty((length,), dtype=launch.acc_dtype(x.dtype))


def _resolved_plan(x: Tensor, dropout_p: float) -> str:
    return launch.resolve_plan(launch.get_forward_plan(), math.prod(x.shape[:-1]), dropout_p)


def _setup_context(ctx, inputs, output, plan=None):
    x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, lora_R, output[1])
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.scalars = (scale, dropout_p, seed, offset)
    ctx.deterministic = deterministic
    ctx.library = (plan or _resolved_plan(x, dropout_p)) == "library"


def _backward(ctx, grad_y, grad_xa, bwd=None):
    x, weight, lora_A, lora_B, lora_R, xa = ctx.saved_tensors
    need_dx, need_dw, need_dbias, need_da, need_db, need_dr = ctx.needs_input_grad[:6]
    need_dbias = need_dbias and ctx.bias_dtype is not None
    need_dr = need_dr and lora_R is not None
    r, k, n = lora_A.shape[0], x.shape[-1], weight.shape[0]
    if grad_y is None:
        grad_y = x.new_zeros((*x.shape[:-1], n))
    dx, flat = (bwd or lora_bwd)(
        grad_y, x, weight, lora_A, lora_B, lora_R, xa, *ctx.scalars,
        need_dx, need_da, need_db, need_dbias, need_dr, ctx.deterministic, ctx.library,
    )  # fmt: skip
    off_da, off_db, off_dbias, off_dr, _ = launch.grad_layout(r, k, n, need_da, need_db, need_dbias, need_dr)
    da = flat[off_da : off_da + r * k].view(r, k).to(lora_A.dtype) if need_da else None
    db = flat[off_db : off_db + n * r].view(n, r).to(lora_B.dtype) if need_db else None
    dbias = flat[off_dbias : off_dbias + n].to(ctx.bias_dtype) if need_dbias else None
    dr = flat[off_dr : off_dr + r * r].view(r, r).to(lora_R.dtype) if need_dr else None
    dw = None
    if need_dw:  # full fine-tuning: a library GEMM (DESIGN.md), not part of the fused launch budget
        dw = (grad_y.reshape(-1, n).t() @ x.reshape(-1, k)).to(weight.dtype)
    return (dx if need_dx else None), dw, dbias, da, db, dr, None, None, None, None, None


lora_fwd.register_autograd(_backward, setup_context=_setup_context)


class LoRAFunction(torch.autograd.Function):
    """The eager path: the launchers called directly, with the custom op's autograd formula (``_backward``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic):
        plan = _resolved_plan(x, dropout_p)
        y, xa = launch.lora_forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, plan)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic),
                       (y, xa), plan)  # fmt: skip
        ctx.mark_non_differentiable(xa)
        return y, xa

    @staticmethod
    def backward(ctx, grad_y, grad_xa):
        return _backward(ctx, grad_y, grad_xa, bwd=launch.lora_backward)


def lora_apply(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic) -> Tensor:
    """``y``: through the custom op while torch.compile traces, else through :class:`LoRAFunction`."""
    if torch.compiler.is_compiling():
        return lora_fwd(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic)[0]
    return LoRAFunction.apply(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, deterministic)[0]
