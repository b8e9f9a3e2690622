"""Fused decoder-block ops on CPU: Llama's RMSNorm and the MLP's ``SiLU(gate) * up``, one native pass each.

A LoRA step of a small model on a CPU is the frozen base's GEMMs plus a long tail of elementwise ops: each eager
``LlamaRMSNorm`` runs ~6 torch ops forward and ~10 backward over ``[tokens, hidden]`` and keeps their temporaries
for backward; the MLP's ``act_fn(gate) * up`` three more and one more saved ``[tokens, intermediate]`` tensor.
:func:`fuse_blocks` swaps those modules' classes for subclasses whose forward is one pass of
``lora_kernels._cpu`` (csrc/cpu/block_kernels.h) forward and one backward (the norm saves ``x`` and a per-row
``rstd``; the MLP saves ``gate`` and ``up``). Parameters, ``state_dict`` keys, ``isinstance`` and
``save_pretrained`` are unchanged; :func:`unfuse_blocks` restores the classes.

Numerics are the eager modules' step by step (the roundings to the activation dtype included); the results differ
only by one row sum's order and a polynomial ``exp`` (a few fp32 ulp; ``tests/test_fused_blocks.py`` bounds it
against an fp64 oracle by torch's own error).

Taken only where it is the same math: the module classes listed in ``RMSNORM_CLASSES`` / ``MLP_CLASSES`` (Llama's
formula: ``weight * x / rms``, not Gemma's ``(1 + weight)``), a SiLU activation (``nn.SiLU`` or transformers' ``SiLUActivation``), CPU tensors of one dtype
(fp32 / bf16 / fp16). A call outside that (a GPU tensor, fp64, mixed dtypes) runs the eager forward and says so once
on the ``lora_kernels`` logger, naming the module class and the reason.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("lora_kernels")

# transformers classes with exactly Llama's RMSNorm / gated-SiLU MLP (checked against them in the tests)
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned: set[tuple[str, str]] = set()


def _lib():
    from lora_kernels.backends.torch import native

    return native.module()


def unavailable() -> str | None:
    """Why the fused blocks cannot run here (a sentence), or None when ``lora_kernels._cpu`` has the ops."""
    from lora_kernels.backends.torch import native

    ok, why = native.status()
    if not ok:
        return why
    if not hasattr(native.module(), "rms_norm_forward"):
        return "lora_kernels._cpu predates the block ops; rebuild it (python setup.py build_ext --inplace)"
    return None


def _why_not(*tensors: torch.Tensor) -> str | None:
    t0 = tensors[0]
    if t0.device.type != "cpu":
        return f"tensors on {t0.device.type} (the fused blocks are CPU kernels)"
    if t0.dtype not in _DTYPES:
        return f"dtype {t0.dtype} (fused for float32 / bfloat16 / float16)"
    if any(t.dtype != t0.dtype for t in tensors):
        return f"mixed dtypes {sorted({str(t.dtype) for t in tensors})}"
    return None


def _eager_once(module: nn.Module, why: str) -> None:
    key = (type(module).__name__, why)
    if key not in _warned:
        _warned.add(key)
        logger.warning("lora_kernels: %s runs its eager forward, not the fused CPU pass: %s", key[0], why)


def _code(dtype: torch.dtype) -> int:
    from lora_kernels.backends.torch import native

    return native.dtype_code(dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        k = x.shape[-1]
        x2 = x.reshape(-1, k).contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32)
        w = weight.contiguous()
        _lib().rms_norm_forward(x2.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), x2.shape[0], k, eps,
                                _code(x.dtype), torch.get_num_threads())  # fmt: skip
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x2)
            _lib().rms_norm_backward(dy2.data_ptr(), x2.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                                     x2.shape[0], x2.shape[1], _code(x2.dtype), torch.get_num_threads())  # fmt: skip
            dx = dx.view(ctx.x_shape)
        dw = None
        if ctx.needs_input_grad[1]:  # full fine-tuning: d(weight * T(h)) / d weight, summed over rows (rare path)
            h = (x2.float() * rstd.unsqueeze(1)).to(x2.dtype)
            dw = (dy2 * h).sum(0)
        return dx, dw, None


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g)
        _lib().silu_mul_forward(g.data_ptr(), u.data_ptr(), y.data_ptr(), g.numel(), _code(g.dtype),
                                torch.get_num_threads())  # fmt: skip
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u = ctx.saved_tensors
        d = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _lib().silu_mul_backward(d.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel(),
                                 _code(g.dtype), torch.get_num_threads())  # fmt: skip
        return dg, du


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * T(x * rsqrt(mean(x²) + eps))`` over the last dim, fused (CPU, one dtype)."""
    return _RMSNorm.apply(x, weight, float(eps))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``T(silu(gate)) * up``, fused (CPU, one dtype, same shape)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return _SiLUMul.apply(gate, up)


def _norm_forward(self, hidden_states):
    why = _why_not(hidden_states, self.weight)
    if why:
        _eager_once(self, why)
        return self._lk_eager_forward(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    why = _why_not(gate, up)
    if why:
        _eager_once(self, why)
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(silu_mul(gate, up))


_SUBCLASSES: dict[type, type] = {}


def _is_silu(act) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation (forward = F.silu), or torch's nn.SiLU
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _fused_class(cls: type, forward) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "_lk_fused_base": cls,
                                                       "_lk_eager_forward": cls.forward})  # fmt: skip
    return _SUBCLASSES[cls]


def fuse_blocks(model: nn.Module) -> dict[str, int]:
    """Swap every Llama-style RMSNorm and gated-SiLU MLP of ``model`` to the fused CPU ops, in place.

    Returns ``{"rms_norm": n, "mlp": m}``, the modules swapped. Raises RuntimeError when the native ops are not
    available (:func:`unavailable` says why; check it first to choose).
    """
    why = unavailable()
    if why:
        raise RuntimeError(f"fused blocks need lora_kernels._cpu: {why}")
    counts = {"rms_norm": 0, "mlp": 0}
    for mod in model.modules():
        base = getattr(type(mod), "_lk_fused_base", type(mod))
        name = base.__name__
        if name in RMSNORM_CLASSES and hasattr(mod, "weight") and hasattr(mod, "variance_epsilon"):
            mod.__class__ = _fused_class(base, _norm_forward)
            counts["rms_norm"] += 1
        elif name in MLP_CLASSES and _is_silu(getattr(mod, "act_fn", None)):
            mod.__class__ = _fused_class(base, _mlp_forward)
            counts["mlp"] += 1
    return counts


def unfuse_blocks(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_blocks` (the eager transformers classes again)."""
    for mod in model.modules():
        base = getattr(type(mod), "_lk_fused_base", None)
        if base is not None:
            mod.__class__ = base
    return model
