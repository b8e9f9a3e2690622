"""Backends of the fused LoRA op: the interface (``base``), the open registry (``registry``), ``auto``'s rules
(``heuristics``), the dropout mask every backend draws (``mask``), and one package per backend: ``torch``
(pure PyTorch, CPU path and test oracle), ``triton``, ``cuda``. How to add one: ``README.md`` here.

Importing this package imports no backend.
"""

from .base import Backend, BackendUnavailableError, LoRAOpts
from .registry import (
    ENTRY_POINT_GROUP,
    ENV_VAR,
    auto_order,
    backend_info,
    get,
    get_backend,
    names,
    register_backend,
    resolve,
    set_backend,
    unregister_backend,
    validate_backend_name,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "Backend",
    "BackendUnavailableError",
    "LoRAOpts",
    "auto_order",
    "backend_info",
    "get",
    "get_backend",
    "names",
    "register_backend",
    "resolve",
    "set_backend",
    "unregister_backend",
    "validate_backend_name",
]
