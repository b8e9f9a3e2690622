"""``AdapterLinear``: the adapter-parameter core shared by ``LoRALinear`` and ``SubspaceLinear``.

It *is* an ``nn.Linear`` (subclass), so code that checks ``isinstance(m, nn.Linear)`` keeps working, and its
``state_dict`` keeps the base keys ``weight`` / ``bias``; the adapter adds ``lora_A.weight`` (``[r, in]``),
``lora_B.weight`` (``[out, r]``) and, for the subspace method, ``lora_R`` (``[r, r]``). ``from_linear`` shares the
base ``Parameter`` objects (no copy). The forward is the fused op::

    y = x Wᵀ + b + scaling · B [R] A (dropout(x))        scaling = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

A subclass says how its adapter starts (``DEFAULT_INIT``, ``check_init``, ``reset_lora_parameters``); everything
else lives here: argument checks, the adapter dtype, merge / unmerge, the forward.

Adapter dtype: independent of the base dtype. The default is fp32 for fp32/fp16/bf16 bases (PEFT's
``autocast_adapter_dtype``: bf16 adapters lose most of a small update to rounding), fp64 for an fp64 base.

``merge()`` folds ``scaling·B [R] A`` into the base weight (computed in fp32, cast once) and refuses — weight
untouched — when the result would not be finite in the base dtype; ``unmerge()`` subtracts it again (exact in fp32
up to rounding; in bf16/fp16 the round trip carries the base dtype's rounding, as in PEFT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.registry import validate_backend_name
from ..functional import lora_linear
from ..quant import nf4 as _nf4
from .checks import check_adapter_dtype, check_alpha, check_dropout, check_r, scaling_for


class _ClassDefault:
    """Sentinel for ``init_lora_weights``: the class's ``DEFAULT_INIT`` (``None`` stays an invalid value)."""

    def __repr__(self) -> str:
        return "<class default>"


CLASS_DEFAULT = _ClassDefault()


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 unless the base is fp64 (gradcheck): the functional op accepts fp32 adapters for any activation dtype."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


class AdapterLinear(nn.Linear):
    """``nn.Linear`` + a low-rank adapter. Subclasses set ``DEFAULT_INIT`` and implement ``check_init`` and
    ``reset_lora_parameters``.

    Attributes: ``weight``, ``bias`` (base), ``lora_A`` / ``lora_B`` (``nn.Linear`` submodules without bias),
    ``lora_R`` (``None`` unless the subclass trains an ``r x r`` middle matrix), ``r``, ``lora_alpha``,
    ``lora_dropout`` (probability), ``use_rslora``, ``scaling``, ``merged``, ``backend`` (``None`` = the global
    choice), ``deterministic``.
    """

    KIND = "adapter"  # how messages name this adapter
    DEFAULT_INIT: str | bool = "kaiming"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights=CLASS_DEFAULT,
        adapter_dtype: torch.dtype | None = None,
        backend: str | None = None,
        deterministic: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter(
            r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype, backend, deterministic
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights=CLASS_DEFAULT,
        adapter_dtype: torch.dtype | None = None,
        backend: str | None = None,
        deterministic: bool = False,
    ):
        """Wrap ``linear``: the new module holds the *same* ``weight`` / ``bias`` Parameters (no copy).
        ``init_lora_weights`` defaults to the class's ``DEFAULT_INIT``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, AdapterLinear):
            raise TypeError(
                f"linear is already a {type(linear).__name__}; adapters cannot be stacked on one layer "
                "(LoRA cannot be stacked)"
            )
        if _nf4.is_params4bit(linear.weight):  # a bitsandbytes Linear4bit: stays 4-bit, its weight shared (QLoRA)
            from ..quant.convert import prepare_linear4bit

            prepare_linear4bit(linear)
        self = cls.__new__(cls)
        # Build the nn.Linear shell on the meta device (no allocation), then adopt the base Parameters.
        nn.Linear.__init__(
            self,
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=_nf4.base_dtype(linear.weight),
        )
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_adapter(
            r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype, backend, deterministic
        )
        self.train(linear.training)
        return self

    def _init_adapter(
        self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype, backend, deterministic
    ):
        r = check_r(r)
        if r > min(self.in_features, self.out_features):
            raise ValueError(
                f"r must be <= min(in_features, out_features) = {min(self.in_features, self.out_features)} "
                f"for a [{self.out_features}, {self.in_features}] layer, got r={r}"
            )
        self.r = r
        self.lora_alpha = check_alpha(lora_alpha)
        self.lora_dropout = check_dropout(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = scaling_for(r, self.lora_alpha, self.use_rslora)
        init = self.check_init(self.DEFAULT_INIT if init_lora_weights is CLASS_DEFAULT else init_lora_weights)
        adapter_dtype = check_adapter_dtype(adapter_dtype) or default_adapter_dtype(self.weight.dtype)
        self.backend = None if backend is None else validate_backend_name(backend)
        self.deterministic = bool(deterministic)
        self.merged = False
        dev = self.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=adapter_dtype)
        self.register_parameter("lora_R", None)
        self.reset_lora_parameters(init)

    @classmethod
    def check_init(cls, init_lora_weights):
        """The normalised init name, or a ValueError naming ``init_lora_weights`` and the choices."""
        raise NotImplementedError

    def reset_lora_parameters(self, init_lora_weights=None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """``scaling · B [R] A`` in fp32 (fp64 for fp64 adapters), shape ``[out, in]``."""
        dt = torch.float64 if self.lora_A.weight.dtype == torch.float64 else torch.float32
        b = self.lora_B.weight.detach().to(dt)
        a = self.lora_A.weight.detach().to(dt)
        if self.lora_R is not None:
            b = b @ self.lora_R.detach().to(dt)
        return (b @ a).mul_(self.scaling)

    def _merged_weight(self, sign: float) -> torch.Tensor:
        w = _nf4.dequantize(self.weight) if _nf4.is_params4bit(self.weight) else self.weight.detach()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        out = w.to(acc) + sign * self.delta_weight().to(acc)
        out = out.to(w.dtype)
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            raise ValueError(
                f"{'merge' if sign > 0 else 'unmerge'} would produce {bad} non-finite values in the "
                f"{tuple(w.shape)} {w.dtype} base weight; refusing (weight left untouched)"
            )
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (in place). A no-op when already merged."""
        if self.merged:
            return
        if _nf4.is_params4bit(self.weight):
            raise ValueError("merge() cannot fold an adapter into a 4-bit (bitsandbytes) base in place; "
                             "merge_lora(model) does it as PEFT does (dequantize, merge, re-quantize)")  # fmt: skip
        self.weight.copy_(self._merged_weight(+1.0))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()``. A no-op when not merged."""
        if not self.merged:
            return
        self.weight.copy_(self._merged_weight(-1.0))
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (this module's Parameters, merged in place)."""
        self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            self.lora_dropout,
            self.training,
            lora_R=self.lora_R,
            deterministic=self.deterministic,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"scaling={self.scaling:g}, use_rslora={self.use_rslora}, adapter_dtype={self.lora_A.weight.dtype}, "
            f"backend={self.backend or 'global'}, merged={self.merged}"
        )
