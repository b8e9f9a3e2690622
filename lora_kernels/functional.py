"""``lora_linear``: the functional entry point. Validates arguments once, then dispatches to a backend.

    y = x Wᵀ + b + scale · B (A (dropout(x)))            (PEFT's LoRA Linear, in one fused op)

Every backend receives already-validated tensors, so kernels and launchers can assume valid input.
"""

from __future__ import annotations

import math

import torch

from .backends import mask as _rng
from .backends.base import LoRAOpts
from .backends.registry import resolve
from .quant import nf4 as _nf4

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_VALID_SIGS: set[tuple] = set()  # tensor signatures validate() accepted
_OPTS_NO_DROPOUT: dict[tuple, LoRAOpts] = {}  # (scale, seed, offset, deterministic) -> its options, dropout off


def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float32, float16, bfloat16 or float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def validate(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument; return None when all is consistent."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., in_features], got shape {tuple(x.shape)}")
    quantized = isinstance(weight, _nf4.QuantWeight4bit)  # a bitsandbytes 4-bit base (lora_linear describes it)
    if quantized:
        _nf4.check_op_weight(weight, x)
    else:
        _check_tensor("weight", weight, 2)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    n, k = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x.shape[-1] must equal weight.shape[1] (in_features={k}), got x of shape {tuple(x.shape)}")
    if lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape [r, in_features={k}], got {tuple(lora_A.shape)}")
    if r < 1:
        raise ValueError(f"lora_A must have at least one row (rank r >= 1), got shape {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must have shape [out_features={n}, r={r}], got {tuple(lora_B.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape [out_features={n}], got {tuple(bias.shape)}")
    if lora_R is not None:
        _check_tensor("lora_R", lora_R, 2)
        if tuple(lora_R.shape) != (r, r):
            raise ValueError(f"lora_R must have shape [r={r}, r={r}], got {tuple(lora_R.shape)}")
    if not quantized and weight.dtype != x.dtype:
        raise TypeError(
            f"weight dtype must equal x dtype {x.dtype} (cast the base layer or the input), got {weight.dtype}"
        )
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype must equal x dtype {x.dtype}, got {bias.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B dtype must equal lora_A dtype {lora_A.dtype}, got {lora_B.dtype}")
    if lora_R is not None and lora_R.dtype != lora_A.dtype:
        raise TypeError(f"lora_R dtype must equal lora_A dtype {lora_A.dtype}, got {lora_R.dtype}")
    allowed = {x.dtype, torch.float32} if x.dtype != torch.float64 else {torch.float64}
    if lora_A.dtype not in allowed:
        raise TypeError(
            f"lora_A dtype must be float32 or the activation dtype {x.dtype}, got {lora_A.dtype}"
            if x.dtype != torch.float64
            else f"lora_A dtype must be float64 when x is float64, got {lora_A.dtype}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B), ("lora_R", lora_R)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on the same device as x ({x.device}), got {t.device}")
    _check_scalars(scale, dropout_p)


def _check_scalars(scale, dropout_p) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _tensor_sig(t) -> tuple:
    return (type(t), t.shape, t.dtype, t.device)


def _validate_cached(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p) -> None:
    """:func:`validate`, run in full once per tensor signature (types, shapes, dtypes, devices: all it looks at).

    A training step calls every layer with the same few signatures; the checks of ``scale`` and ``dropout_p``
    (plain values) run on every call. Anything that is not a tensor lacks the attributes and is judged in full.
    """
    try:
        sig = (type(x), x.shape, x.dtype, x.device, type(weight), weight.shape, weight.dtype, weight.device,
               type(lora_A), lora_A.shape, lora_A.dtype, lora_A.device, type(lora_B), lora_B.shape, lora_B.dtype,
               lora_B.device, bias is None or _tensor_sig(bias), lora_R is None or _tensor_sig(lora_R))  # fmt: skip
    except AttributeError:
        sig = None
    if sig is None or sig not in _VALID_SIGS:
        validate(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p)
        if sig is not None:
            if len(_VALID_SIGS) >= 4096:
                _VALID_SIGS.clear()
            _VALID_SIGS.add(sig)
        return
    _check_scalars(scale, dropout_p)


def _autocasting(x, weight, bias, lora_A, lora_B, lora_R) -> bool:
    """Whether autocast applies to this call: it is on for x's device and every tensor argument is a float16/32
    tensor (anything else, fp64 included, goes to ``validate`` untouched and is judged there)."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return False
    for t in (x, None if isinstance(weight, _nf4.QuantWeight4bit) else weight, bias, lora_A, lora_B, lora_R):
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES[:3]):
            return False
    return True


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    lora_R: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    deterministic: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused ``x Wᵀ + b + scale · (dropout(x) Aᵀ [Rᵀ]) Bᵀ`` with gradients for every input that requires them.

    Args:
        x: ``[..., in_features]`` activations (fp32/fp16/bf16; fp64 for gradcheck).
        weight, bias: the base layer (``nn.Linear`` layout ``[out, in]``); frozen or trainable. ``weight`` may be a
            bitsandbytes 4-bit ``Params4bit`` (NF4/FP4, frozen): it stays 4-bit (lora_kernels.quant.nf4).
        lora_A, lora_B: ``[r, in]`` and ``[out, r]``; fp32 or the activation dtype.
        scale: ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
        dropout_p: dropout on the LoRA input only; applied only when ``training``.
        lora_R: optional ``[r, r]`` middle matrix (subspace method); ``None`` = identity.
        seed, offset: dropout RNG; ``seed=None`` draws one from torch's CPU generator.
        deterministic: bit-reproducible backward (no atomics) where the backend offers it.
        backend: ``auto | torch | triton | cuda``; ``None`` uses the global / environment choice.
    """
    weight = _nf4.as_op_weight(weight)
    if _autocasting(x, weight, bias, lora_A, lora_B, lora_R):
        # Behave like F.linear under autocast: base GEMM operands in the autocast dtype (whatever dtypes x, weight
        # and bias came in); adapters keep their dtype when it is fp32 or the autocast dtype (cast inside the op,
        # fp32 accumulation), else they run in fp32. Validation happens in the call below, on what the op sees.
        device_type = x.device.type
        dt = torch.get_autocast_dtype(device_type)
        x = x.to(dt)
        weight = weight if isinstance(weight, _nf4.QuantWeight4bit) else weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        if lora_A.dtype not in (dt, torch.float32):
            lora_A, lora_B = lora_A.float(), lora_B.float()
            lora_R = lora_R.float() if lora_R is not None else None
        with torch.autocast(device_type, enabled=False):
            return lora_linear(
                x,
                weight,
                bias,
                lora_A,
                lora_B,
                scale,
                dropout_p,
                training,
                lora_R=lora_R,
                seed=seed,
                offset=offset,
                deterministic=deterministic,
                backend=backend,
            )
    _validate_cached(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p)
    p = float(dropout_p) if training else 0.0
    if p > 0 and seed is None:
        seed = _rng.draw_seed()
    if seed is not None and not (0 <= int(seed) <= _rng.SEED_MAX):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if p > 0:  # a fresh seed per call: a new options object
        opts = LoRAOpts(
            scale=float(scale), dropout_p=p, seed=int(seed), offset=offset, deterministic=bool(deterministic)
        )
    else:  # the same few option sets every call (one per layer scale): built once
        key = (scale, seed, offset, deterministic)
        opts = _OPTS_NO_DROPOUT.get(key)
        if opts is None:
            if len(_OPTS_NO_DROPOUT) >= 1024:
                _OPTS_NO_DROPOUT.clear()
            opts = _OPTS_NO_DROPOUT[key] = LoRAOpts(
                scale=float(scale), dropout_p=0.0, seed=int(seed or 0), offset=offset, deterministic=bool(deterministic)
            )
    args = (x, weight, bias, lora_A, lora_B, lora_R, opts)
    return resolve(args, backend).apply(*args)


def lora_linear_reference(
    x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, training=True, *, lora_R=None, seed=0, offset=0
):
    """Unfused eager composition (``F.linear`` + ``B(A(dropout(x))) * scale``) with the package's dropout mask.

    Not a backend: it is what PEFT computes, used to check the fused paths and as a benchmark provider.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x
    if training and dropout_p > 0:
        k = x.shape[-1]
        xd = _rng.apply_dropout(x.reshape(-1, k), seed, offset, dropout_p).view(x.shape)
    h = torch.nn.functional.linear(xd.to(lora_A.dtype), lora_A)
    if lora_R is not None:
        h = torch.nn.functional.linear(h, lora_R)
    return y + (torch.nn.functional.linear(h, lora_B) * scale).to(y.dtype)
