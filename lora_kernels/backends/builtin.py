"""The built-in backends' registry entries. Availability checks here stay cheap and import nothing heavy.

Each backend package is imported inside these functions with plain import statements (not importlib calls): the
first call pays the import, ``import lora_kernels`` stays lean, and torch.compile traces straight through.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .base import Backend
from .heuristics import BUILTIN_PRIORITY


def _torch_apply(*args):
    if not isinstance(args[1], torch.Tensor):  # a 4-bit base (lora_kernels.quant.nf4.QuantWeight4bit)
        from .torch import qlora

        return qlora.apply_4bit(*args)
    from .torch import lora

    return lora.apply(*args)


def _torch_supports(*args):
    from .torch import lora

    return lora.supports(*args)


def _torch_available() -> tuple[bool, str]:
    from .torch import native  # imports torch only; the native module itself is looked up once, here or on first use

    ok, why = native.status()
    cpu_dropout = f"fused native pass, {why}" if ok else f"torch ops ({why})"
    return True, f"pure PyTorch; runs on every device; CPU dropout: {cpu_dropout}"


def _triton_apply(*args):
    from .triton import backend

    return backend.apply(*args)


def _triton_supports(*args):
    from .triton import backend

    return backend.supports(*args)


_triton_availability: tuple[bool, str] | None = None


def _triton_available() -> tuple[bool, str]:
    # Asked on every call that may run triton: find_spec walks sys.path while triton is not yet imported, so the
    # answer is taken once per process (installing triton into a running process is not supported).
    global _triton_availability
    if _triton_availability is None:
        if importlib.util.find_spec("triton") is None:
            _triton_availability = (False, "the 'triton' package is not installed (pip install triton)")
        else:
            _triton_availability = (True, "triton is importable")
    return _triton_availability


def _cuda_apply(*args):
    from .cuda import backend

    return backend.apply(*args)


def _cuda_supports(*args):
    from .cuda import backend

    return backend.supports(*args)


def _cuda_available() -> tuple[bool, str]:
    if os.environ.get("LORA_KERNELS_DISABLE_CUDA_EXT") == "1":
        return False, "disabled by LORA_KERNELS_DISABLE_CUDA_EXT=1"
    try:
        from .cuda import backend
    except ImportError as e:  # a broken install must say so, not crash selection
        return False, f"lora_kernels.backends.cuda.backend failed to import: {e}"
    return backend.availability()


def register_all(registry: dict[str, Backend]) -> None:
    """Fill ``registry`` (the registry's own dict: this module does not import the registry)."""
    for name, apply_fn, avail_fn, supports_fn in (
        ("torch", _torch_apply, _torch_available, _torch_supports),
        ("triton", _triton_apply, _triton_available, _triton_supports),
        ("cuda", _cuda_apply, _cuda_available, _cuda_supports),
    ):
        registry[name] = Backend(name, apply_fn, avail_fn, supports_fn, dict(BUILTIN_PRIORITY[name]))
