"""The backend registry and per-call selection. Open: any package may register a backend under a new name.

Where backends come from, in order: the built-ins (``builtin.py``: ``torch``, ``triton``, ``cuda``), then the
entry-point group ``lora_kernels.backends`` (each entry point names a callable returning a :class:`Backend`, or a
``Backend`` itself; a broken one is reported by a warning naming it, never skipped silently), then
:func:`register_backend` calls at run time. Registration is lazy: nothing is imported until the first call asks.

Selection order for one call: the module's own choice, else the global one (:func:`set_backend`), else the
environment variable ``LORA_KERNELS_BACKEND``, else ``auto``. An explicit name that cannot run raises
:class:`BackendUnavailableError` with the reason; ``auto`` walks :func:`heuristics.auto_order` for the tensors'
device and logs (once per distinct reason) every faster backend it skipped and why, so no fast path is lost
silently.
"""

from __future__ import annotations

import logging
import os
import re
import threading

from . import heuristics
from .base import Backend, BackendUnavailableError

logger = logging.getLogger("lora_kernels")

ENV_VAR = "LORA_KERNELS_BACKEND"
ENTRY_POINT_GROUP = "lora_kernels.backends"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")

_REGISTRY: dict[str, Backend] = {}
_global_choice: str | None = None
_lock = threading.Lock()
_logged: set[str] = set()
_registered = False


def _is_compiling() -> bool:
    import torch

    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Add ``backend`` under ``backend.name`` (lower-case letters, digits, ``_``/``-``; not ``auto``).

    A name already registered is refused unless ``replace=True`` (e.g. a test double for a built-in).
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a lora_kernels.backends.Backend, got {type(backend).__name__}")
    name = backend.name
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == "auto":
        raise ValueError(f"backend name must be lower-case letters, digits, '_' or '-' and not 'auto', got {name!r}")
    _ensure_registered()
    if name in _REGISTRY and not replace:
        raise ValueError(f"a backend named {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = backend


def unregister_backend(name: str) -> None:
    """Remove a backend registered at run time (the built-ins can be replaced, not removed)."""
    if name in ("torch", "triton", "cuda"):
        raise ValueError(f"the built-in backend {name!r} cannot be removed (register a replacement instead)")
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered backend names, in registration order (without ``auto``)."""
    _ensure_registered()
    return tuple(_REGISTRY)


def _log_once(level: int, msg: str) -> None:
    if _is_compiling():
        return  # logged by the eager call that preceded compilation; no locks inside a traced graph
    with _lock:
        if msg in _logged:
            return
        _logged.add(msg)
    logger.log(level, msg)


def validate_backend_name(name: str, argname: str = "backend") -> str:
    """``name`` lower-cased when it is ``auto`` or a registered backend, else a ValueError naming ``argname``."""
    if isinstance(name, str):
        low = name.lower()
        if low == "auto" or low in _REGISTRY:
            return low
        _ensure_registered()
        if low in _REGISTRY:
            return low
    raise ValueError(f"{argname} must be one of {('auto', *names())}, got {name!r}")


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``None`` resets to the env var / ``auto``)."""
    global _global_choice
    choice = None if name is None else validate_backend_name(name)
    if choice not in (None, "auto"):
        ok, why = get(choice).availability()
        if not ok:
            _global_choice = None
            raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    _global_choice = choice


def get_backend() -> str:
    """The configured backend name (``auto`` unless set globally or through ``LORA_KERNELS_BACKEND``)."""
    if _global_choice is not None:
        return _global_choice
    env = os.environ.get(ENV_VAR)
    if env:
        return validate_backend_name(env, argname=f"environment variable {ENV_VAR}")
    return "auto"


def get(name: str) -> Backend:
    _ensure_registered()
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"backend {name!r} is not registered (registered: {names()})")
    return _REGISTRY[name]


def auto_order(device_type: str, args: tuple) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``args`` = (x, weight, bias, lora_A, lora_B, lora_R, opts)."""
    _ensure_registered()
    x, opts = args[0], args[-1]
    priorities = {name: b.auto_priority for name, b in _REGISTRY.items()}
    return heuristics.auto_order(device_type, heuristics.rows_of(x.shape), opts.dropout_p, priorities)


def resolve(args: tuple, requested: str | None = None) -> Backend:
    """Pick the backend for one call. ``args`` = (x, weight, bias, lora_A, lora_B, lora_R, opts)."""
    _ensure_registered()
    name = validate_backend_name(requested) if requested else get_backend()
    device_type = args[0].device.type
    if name != "auto":
        backend = _REGISTRY[name]
        ok, why = backend.availability()
        if ok:
            ok, why = backend.supports(*args)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} cannot run this call: {why}")
        _log_once(logging.INFO, f"lora_kernels: using backend {name!r} on {device_type} (explicitly selected)")
        return backend
    skipped = []
    order = auto_order(device_type, args)
    for cand in order:
        backend = _REGISTRY[cand]
        ok, why = backend.availability()
        if ok:
            ok, why = backend.supports(*args)
        if ok:
            for skipped_name, skipped_why in skipped:
                _log_once(
                    logging.WARNING,
                    f"lora_kernels: auto skipped faster backend {skipped_name!r} on {device_type}: {skipped_why}",
                )
            _log_once(logging.INFO, f"lora_kernels: auto selected backend {cand!r} on {device_type} (order {order})")
            return backend
        skipped.append((cand, why))
    reasons = "; ".join(f"{n}: {w}" for n, w in skipped) or f"no registered backend runs on {device_type}"
    raise BackendUnavailableError(f"no backend can run this call on {device_type}: {reasons}")


def backend_info() -> dict:
    """What each backend can do here, and what is configured. Cheap; never initialises CUDA."""
    _ensure_registered()
    priorities = {name: b.auto_priority for name, b in _REGISTRY.items()}
    info = {"configured": get_backend(), "auto_preference": heuristics.preference_table(priorities), "backends": {}}
    for name, backend in _REGISTRY.items():
        ok, why = backend.availability()
        info["backends"][name] = {"available": ok, "reason": why}
    return info


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            backend = obj if isinstance(obj, Backend) else obj()
            if backend.name in _REGISTRY:
                raise ValueError(f"its name {backend.name!r} is already registered")
            register_backend(backend)
        except Exception as e:  # a broken third-party backend must not break the package: say which and why
            _log_once(logging.WARNING, f"lora_kernels: backend entry point {ep.name!r} ({ep.value}) not loaded: {e}")


def _ensure_registered() -> None:
    """Register the built-in backends and the entry points once (their modules import lazily: this is cheap)."""
    global _registered
    if _registered:
        return
    _registered = True
    from . import builtin

    builtin.register_all(_REGISTRY)
    _load_entry_points()
