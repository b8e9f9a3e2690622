"""Argument checks shared by the adapter layers (``LoRALinear``, ``SubspaceLinear``) and the adapter configs.

Each raises ``ValueError`` / ``TypeError`` naming the argument and what was expected.
"""

from __future__ import annotations

import math

import torch

INIT_CHOICES = ("kaiming", "gaussian", "pissa", False)


def check_r(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int (the LoRA rank), got {r!r}")
    return r


def check_alpha(lora_alpha) -> float:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite positive number, got {lora_alpha!r}")
    if lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a finite positive number, got {lora_alpha!r}")
    return lora_alpha


def check_dropout(lora_dropout) -> float:
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, (int, float))
        or not (0.0 <= float(lora_dropout) < 1.0)
    ):
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
    return float(lora_dropout)


def check_init(init_lora_weights):
    # `True` is accepted as PEFT's spelling of the default.
    if init_lora_weights is True:
        return "kaiming"
    if init_lora_weights not in INIT_CHOICES or isinstance(init_lora_weights, int) and init_lora_weights is not False:
        raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES} (or True), got {init_lora_weights!r}")
    return init_lora_weights


def check_adapter_dtype(adapter_dtype):
    if adapter_dtype is None:
        return None
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise TypeError(f"adapter_dtype must be None or a floating torch.dtype, got {adapter_dtype!r}")
    return adapter_dtype


def scaling_for(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023), as PEFT computes it."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
