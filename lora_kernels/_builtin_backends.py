"""Registration of the built-in backends. Availability checks here must stay cheap and import nothing heavy."""

from __future__ import annotations

import importlib.util
import os

from .backends import Backend, register_backend

# Implementations are imported inside these functions with plain import statements (not importlib calls): the
# first call pays the import, `import lora_kernels` stays lean, and torch.compile traces straight through.


def _torch_apply(*args):
    from .ops import torch_lora

    return torch_lora.apply(*args)


def _torch_supports(*args):
    from .ops import torch_lora

    return torch_lora.supports(*args)


def _torch_available() -> tuple[bool, str]:
    return True, "pure PyTorch; runs on every device"


def _triton_apply(*args):
    from .triton import backend

    return backend.apply(*args)


def _triton_supports(*args):
    from .triton import backend

    return backend.supports(*args)


_triton_availability: tuple[bool, str] | None = None


def _triton_available() -> tuple[bool, str]:
    # Asked on every call that may run triton (each lora_linear with auto or backend="triton"): the two find_spec
    # lookups cost ~48 us together on the 2-core CI machine while triton is not yet imported (a sys.path walk), ~3 us
    # once it is; the answer is taken once per process (installing triton into a running process is not supported).
    global _triton_availability
    if _triton_availability is None:
        if importlib.util.find_spec("triton") is None:
            _triton_availability = (False, "the 'triton' package is not installed (pip install triton)")
        elif importlib.util.find_spec("lora_kernels.triton") is None:
            _triton_availability = (False, "this build of lora_kernels has no triton kernels")
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
    if importlib.util.find_spec("lora_kernels.cuda") is None:
        return False, "this build of lora_kernels has no CUDA backend module"
    try:
        from .cuda import backend
    except ImportError as e:  # a broken install must say so, not crash selection
        return False, f"lora_kernels.cuda.backend failed to import: {e}"
    return backend.availability()


def register_all() -> None:
    register_backend(Backend("torch", _torch_apply, _torch_available, _torch_supports))
    register_backend(Backend("triton", _triton_apply, _triton_available, _triton_supports))
    register_backend(Backend("cuda", _cuda_apply, _cuda_available, _cuda_supports))
