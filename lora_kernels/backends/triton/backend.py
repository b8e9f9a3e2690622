"""The ``triton`` backend's registry hooks (lora_kernels.backends.builtin): ``supports`` and ``apply``."""

from __future__ import annotations

import os

import torch

from ..base import LoRAOpts

MAX_RANK = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def supports(x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> tuple[bool, str]:
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, "triton kernels need a CUDA device (or TRITON_INTERPRET=1 for tests)"
    elif x.device.type != "cuda":
        return False, f"triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), got {x.device.type}"
    if x.dtype not in _DTYPES:
        return (
            False,
            f"triton kernels support float32/float16/bfloat16 activations, got {x.dtype} (use backend='torch')",
        )
    if x.shape[-1] == 0:
        return False, "in_features = 0: nothing for the kernels to tile (the torch backend returns the bias)"
    if lora_A.shape[0] > MAX_RANK:
        return False, f"triton kernels support rank r <= {MAX_RANK}, got r={lora_A.shape[0]}"
    if not isinstance(weight, torch.Tensor):  # a 4-bit base (lora_kernels.quant.nf4.QuantWeight4bit): nf4.py
        from .nf4 import supports_4bit

        return supports_4bit(x, weight, bias, lora_A, lora_B, lora_R, opts)
    return True, "fused triton kernels"


def apply(x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):  # a 4-bit base: the 4-bit GEMM + the library plan's LoRA kernels
        from .nf4 import apply_4bit

        return apply_4bit(x, weight, bias, lora_A, lora_B, lora_R, opts)
    from .ops import TRITON_OP

    return TRITON_OP.apply(x, weight, bias, lora_A, lora_B, lora_R, opts)
