"""Loading the native module ``lora_kernels._C`` (plan ``fused``; once, never initialising CUDA), its constants,
and the facts every CUDA plan reads once (the device capability). Imported by the backend's hooks and by the
plans; imports neither (it breaks the backend <-> ops cycle)."""

from __future__ import annotations

import importlib

import torch

from ..base import BackendUnavailableError

BUILD_HINT = (
    "build it with `LORA_KERNELS_CUDA_ARCHS=90 python setup.py build_ext --inplace` "
    "(or `pip install -e . --no-build-isolation`; needs nvcc, CMake >= 3.18, pybind11)"
)
MAX_RANK = 256
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_native = None
_native_error: str | None = None


def _load_native():
    """Import ``lora_kernels._C`` once; return ``(module or None, error text)``. Never initialises CUDA."""
    global _native, _native_error
    if _native is None and _native_error is None:
        try:
            _native = importlib.import_module("lora_kernels._C")
        except ImportError as exc:
            _native_error = str(exc)
    return _native, _native_error


def _require_native():
    mod, err = _load_native()
    if mod is None:
        raise BackendUnavailableError(f"lora_kernels._C not built ({err}): {BUILD_HINT}")
    return mod


_capabilities: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of ``device``, asked once per device (the driver call costs host time on every call)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capabilities.get(idx)
    if cap is None:
        cap = _capabilities[idx] = torch.cuda.get_device_capability(idx)
    return cap
