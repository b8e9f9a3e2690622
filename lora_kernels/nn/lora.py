"""``LoRALinear``: an ``nn.Linear`` with a LoRA adapter (PEFT's ``peft.tuners.lora.Linear``), over the adapter
core :class:`lora_kernels.nn.core.AdapterLinear` (fused forward, merge/unmerge, dtypes, checks).

    y = x Wᵀ + b + scaling · B (A (dropout(x)))        scaling = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

Its ``state_dict`` is PEFT's: the base keys stay ``weight`` / ``bias``, the adapter adds ``lora_A.weight``
(``[r, in]``) and ``lora_B.weight`` (``[out, r]``).

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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.nf4 import is_params4bit
from .checks import check_init
from .core import AdapterLinear, default_adapter_dtype

__all__ = ["LoRALinear", "default_adapter_dtype"]


class LoRALinear(AdapterLinear):
    """``nn.Linear`` + LoRA adapter. Build it with ``from_linear`` (shares the base weights) or like ``nn.Linear``
    (keyword arguments ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``,
    ``adapter_dtype``, ``backend``, ``deterministic``). Attributes: see :class:`AdapterLinear`.
    """

    KIND = "LoRA"  # how messages name this adapter
    DEFAULT_INIT = "kaiming"

    @classmethod
    def check_init(cls, init_lora_weights):
        return check_init(init_lora_weights)

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
        if is_params4bit(self.weight):
            raise ValueError("the pissa init rewrites the base weight, which a 4-bit (bitsandbytes) base cannot hold; "
                             "use init_lora_weights='kaiming' or 'gaussian'")  # fmt: skip
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
