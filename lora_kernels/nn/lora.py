"""``LoRALinear``: an ``nn.Linear`` with a LoRA adapter, computed by the fused op ``lora_kernels.functional.lora_linear``.

    y = x Wᵀ + b + scaling · B (A (dropout(x)))        scaling = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

It *is* an ``nn.Linear`` (subclass), so code that checks ``isinstance(m, nn.Linear)`` keeps working, and its
``state_dict`` is PEFT's: the base keys stay ``weight`` / ``bias``, the adapter adds ``lora_A.weight`` (``[r, in]``)
and ``lora_B.weight`` (``[out, r]``). ``from_linear`` shares the base ``Parameter`` objects (no copy).

Adapter dtype: independent of the base dtype. The default is fp32 for fp32/fp16/bf16 bases (PEFT's
``autocast_adapter_dtype``: bf16 adapters lose most of a small update to rounding), fp64 for an fp64 base.

Inits (``init_lora_weights``):

* ``"kaiming"`` (PEFT's default, ``True`` there): A ~ kaiming-uniform(a=√5), B = 0, so the layer starts equal to
  the base layer.
* ``"gaussian"``: A ~ N(0, 1/r²) (std 1/r, as PEFT), B = 0.
* ``"pissa"`` (Meng et al. 2024): with ``W = U S Vᵀ``, the top-r part goes into the adapter,
  ``A = diag(√(S_r/s)) V_rᵀ`` and ``B = U_r diag(√(S_r/s))`` so that ``s·B·A = U_r S_r V_rᵀ``, and the base weight
  becomes the *residual* ``W - U_r S_r V_rᵀ`` (written in place into the shared base ``Parameter``). The layer's
  output is unchanged at init, but **a PiSSA adapter is only meaningful on top of that residual base**: saving
  the adapter alone and loading it onto the original weights gives a different model.
* ``False``: A and B both random (``nn.Linear``'s default init); the layer no longer equals the base at init.
  Useful for tests.

``merge()`` folds ``s·B·A`` into the base weight (computed in fp32, cast once) and refuses — weight untouched —
when the result would not be finite in the base dtype; ``unmerge()`` subtracts it again (exact in fp32 up to
rounding; in bf16/fp16 the round trip carries the base dtype's rounding, as in PEFT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.registry import validate_backend_name
from ..functional import lora_linear
from .checks import (
    check_adapter_dtype,
    check_alpha,
    check_dropout,
    check_init,
    check_r,
    scaling_for,
)


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 unless the base is fp64 (gradcheck): the functional op accepts fp32 adapters for any activation dtype."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


class LoRALinear(nn.Linear):
    """``nn.Linear`` + LoRA adapter. Build it with ``from_linear`` (shares the base weights) or like ``nn.Linear``.

    Attributes: ``weight``, ``bias`` (base), ``lora_A`` / ``lora_B`` (``nn.Linear`` submodules without bias),
    ``lora_R`` (``None``: reserved for an ``r x r`` middle matrix), ``r``, ``lora_alpha``, ``lora_dropout``
    (probability), ``use_rslora``, ``scaling``, ``merged``, ``backend`` (``None`` = the global choice),
    ``deterministic``.
    """

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
        init_lora_weights: str | bool = "kaiming",
        adapter_dtype: torch.dtype | None = None,
        backend: str | None = None,
        deterministic: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(
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
        init_lora_weights: str | bool = "kaiming",
        adapter_dtype: torch.dtype | None = None,
        backend: str | None = None,
        deterministic: bool = False,
    ) -> LoRALinear:
        """Wrap ``linear``: the new module holds the *same* ``weight`` / ``bias`` Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LoRALinear):
            raise TypeError("linear is already a LoRALinear; LoRA cannot be stacked on one layer")
        self = cls.__new__(cls)
        # Build the nn.Linear shell on the meta device (no allocation), then adopt the base Parameters.
        nn.Linear.__init__(
            self,
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
        )
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_lora(
            r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype, backend, deterministic
        )
        self.train(linear.training)
        return self

    def _init_lora(
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
        init = check_init(init_lora_weights)
        adapter_dtype = check_adapter_dtype(adapter_dtype) or default_adapter_dtype(self.weight.dtype)
        self.backend = None if backend is None else validate_backend_name(backend)
        self.deterministic = bool(deterministic)
        self.merged = False
        dev = self.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=adapter_dtype)
        self.register_parameter("lora_R", None)
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: str | bool = "kaiming") -> None:
        init = check_init(init_lora_weights)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        elif init == "pissa":
            self._pissa_init()
        else:  # False: both random, as nn.Linear initialises them
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))

    def _pissa_init(self) -> None:
        if self.merged:
            raise ValueError("cannot apply the pissa init to a merged layer; unmerge() first")
        w = self.weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = self.r
        root = (s[:r] / self.scaling).sqrt()  # split sqrt(S_r / s) between A and B
        a = root[:, None] * vh[:r]  # [r, in]
        b = u[:, :r] * root[None, :]  # [out, r]
        residual = w - self.scaling * (b @ a)
        if not torch.isfinite(residual.to(self.weight.dtype)).all():
            raise ValueError("pissa init would make the residual base weight non-finite; weight left untouched")
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        self.weight.copy_(residual)

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
        w = self.weight.detach()
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
