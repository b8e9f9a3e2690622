"""The native CPU dropout pass ``lora_kernels._cpu`` (csrc/cpu/), loaded on first use, never at import.

It computes ``x ⊙ Z / (1-p)`` (and in backward also ``dX += α·(T ⊙ Z)``) in one pass per row range, hashing the
mask on the fly with the package's definition (:mod:`lora_kernels.backends.mask`), bit for bit. When the module is
not built (no C++ compiler at install time), disabled (``LORA_KERNELS_DISABLE_CPU_EXT=1``) or broken, the torch
backend hashes the mask with torch int32 ops instead and says so once, with the reason, on the ``lora_kernels``
logger (:func:`status` returns the same reason).
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger("lora_kernels")

DISABLE_ENV = "LORA_KERNELS_DISABLE_CPU_EXT"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_BUILD_HINT = "build it with `python setup.py build_ext --inplace` (needs a C++ compiler; see csrc/cpu/README.md)"

_module = None
_reason: str | None = None  # None: not looked up yet
_warned = False


def _load():
    global _module, _reason
    if os.environ.get(DISABLE_ENV) == "1":
        _reason = f"disabled by {DISABLE_ENV}=1"
        return None
    try:  # by name: the native module is no lora_kernels Python module (and importing the package here is a cycle)
        _cpu = importlib.import_module("lora_kernels._cpu")
    except ImportError as e:
        _reason = f"lora_kernels._cpu not built ({e}); {_BUILD_HINT}"
        return None
    _module = _cpu
    _reason = f"lora_kernels._cpu (OpenMP: {_cpu.OPENMP}, ISA clones: {_cpu.CLONES})"
    return _cpu


def status() -> tuple[bool, str]:
    """``(available, reason)`` of the native pass (looked up once per process, like the other native builds)."""
    if _reason is None:
        _load()
    return _module is not None, _reason


def module():
    """The loaded module, or None after logging once why the torch int32 path runs instead."""
    global _warned
    if _reason is None:
        _load()
    if _module is None and not _warned:
        _warned = True
        logger.warning(
            "lora_kernels: the torch backend's CPU dropout runs on torch int32 ops (several passes per element), "
            "not the fused native pass: %s",
            _reason,
        )
    return _module


def reset() -> None:
    """Look the module up again on next use (tests flip ``LORA_KERNELS_DISABLE_CPU_EXT``)."""
    global _module, _reason, _warned
    _module, _reason, _warned = None, None, False


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]
