"""Registration of the built-in backends. Availability checks here must stay cheap and import nothing heavy."""

from __future__ import annotations

import importlib
import importlib.util
import os

from .backends import Backend, register_backend


def _lazy(path: str):
    mod, attr = path.split(":")

    def call(*args):
        return getattr(importlib.import_module(mod), attr)(*args)

    return call


def _torch_available() -> tuple[bool, str]:
    return True, "pure PyTorch; runs on every device"


def _triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed (pip install triton)"
    if importlib.util.find_spec("lora_kernels.triton") is None:
        return False, "this build of lora_kernels has no triton kernels"
    return True, "triton is importable"


def _cuda_available() -> tuple[bool, str]:
    if os.environ.get("LORA_KERNELS_DISABLE_CUDA_EXT") == "1":
        return False, "disabled by LORA_KERNELS_DISABLE_CUDA_EXT=1"
    if importlib.util.find_spec("lora_kernels.cuda") is None:
        return False, "this build of lora_kernels has no CUDA backend module"
    try:
        return _lazy("lora_kernels.cuda.backend:availability")()
    except ImportError as e:  # a broken install must say so, not crash selection
        return False, f"lora_kernels.cuda.backend failed to import: {e}"


def register_all() -> None:
    register_backend(
        Backend(
            name="torch",
            apply_path="lora_kernels.ops.torch_lora:apply",
            availability_fn=_torch_available,
            supports_fn=_lazy("lora_kernels.ops.torch_lora:supports"),
        )
    )
    register_backend(
        Backend(
            name="triton",
            apply_path="lora_kernels.triton.backend:apply",
            availability_fn=_triton_available,
            supports_fn=_lazy("lora_kernels.triton.backend:supports"),
        )
    )
    register_backend(
        Backend(
            name="cuda",
            apply_path="lora_kernels.cuda.backend:apply",
            availability_fn=_cuda_available,
            supports_fn=_lazy("lora_kernels.cuda.backend:supports"),
        )
    )
