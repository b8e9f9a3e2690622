"""lora_kernels: fused LoRA linear layers (torch / Triton / CUDA backends), injection, PEFT-format adapters.

Importing this package is cheap: it never initialises CUDA, never imports triton and never loads the native
extension; those are loaded on first use by the backend that needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .backends import (  # noqa: E402
    BackendUnavailableError,
    LoRAOpts,
    backend_info,
    get_backend,
    set_backend,
)
from .functional import lora_linear, lora_linear_reference  # noqa: E402

# Heavier pieces load on first attribute access (PEP 562) so `import lora_kernels` stays lean.
_LAZY = {
    "LoRALinear": "lora_kernels.nn.lora",
    "apply_lora": "lora_kernels.adapters.inject",
    "merge_lora": "lora_kernels.adapters.inject",
    "unmerge_lora": "lora_kernels.adapters.inject",
    "lora_modules": "lora_kernels.adapters.inject",
    "lora_state_dict": "lora_kernels.adapters.inject",
    "LoRAConfig": "lora_kernels.adapters.config",
    "load_smollm2": "lora_kernels.models",
    "SubspaceLinear": "lora_kernels.nn.subspace",
    "apply_subspace": "lora_kernels.adapters.subspace",
    "merge_subspace": "lora_kernels.adapters.subspace",
    "save_subspace": "lora_kernels.adapters.subspace",
    "load_subspace": "lora_kernels.adapters.subspace",
    "save_adapter": "lora_kernels.adapters.io",
    "load_adapter": "lora_kernels.adapters.io",
}

__all__ = [
    "BackendUnavailableError",
    "LoRAOpts",
    "backend_info",
    "get_backend",
    "set_backend",
    "lora_linear",
    "lora_linear_reference",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_kernels' has no attribute {name!r}")
