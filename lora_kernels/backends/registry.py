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

A call's choice is remembered per call class (the requested and configured names, device, dtypes, shapes, bias and
``R`` present, dropout on/off, deterministic) when it was decided by the built-in backends alone, so a training
step does not pay the walk on every layer; it is forgotten whenever a backend is registered or removed or the
global choice changes. Answers involving a backend from outside the package are never remembered (its
``supports()`` may look at anything). The environment switches the built-ins read (``LORA_KERNELS_BACKEND``,
``TRITON_INTERPRET``, ``LORA_KERNELS_DISABLE_CUDA_EXT``) are part of the call class; :func:`clear_resolve_cache`
forgets everything.
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
_BUILTIN: list[Backend] = []  # the Backend objects builtin.register_all made, kept alive so their ids stay unique
_BUILTIN_IDS: set[int] = set()  # their id()s: answers from these alone are cacheable
_resolve_cache: dict[tuple, Backend] = {}
_RESOLVE_CACHE_MAX = 1024  # distinct call classes remembered before the cache starts over
_CUDA_OFF_ENV = "LORA_KERNELS_DISABLE_CUDA_EXT"  # read by the built-in cuda backend's availability


_is_compiling_fn = None


def _is_compiling() -> bool:
    global _is_compiling_fn
    if _is_compiling_fn is None:
        import torch

        _is_compiling_fn = getattr(torch.compiler, "is_compiling", lambda: False)
    return bool(_is_compiling_fn())


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
    _resolve_cache.clear()


def unregister_backend(name: str) -> None:
    """Remove a backend registered at run time (the built-ins can be replaced, not removed)."""
    if name in ("torch", "triton", "cuda"):
        raise ValueError(f"the built-in backend {name!r} cannot be removed (register a replacement instead)")
    _REGISTRY.pop(name, None)
    _resolve_cache.clear()


def clear_resolve_cache() -> None:
    """Forget every remembered per-call-class choice (the next call of each class walks the backends again)."""
    _resolve_cache.clear()


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
    _resolve_cache.clear()
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


def _call_class(args: tuple, requested: str | None) -> tuple:
    x, weight, bias, lora_A, _, lora_R, opts = args
    env = os.environ
    return (requested, _global_choice, env.get(ENV_VAR), env.get("TRITON_INTERPRET"), env.get(_CUDA_OFF_ENV), x.device,
            x.dtype, x.shape, weight.shape[0], lora_A.dtype, lora_A.shape[0], bias is None, lora_R is None,
            opts.dropout_p > 0, opts.deterministic)  # fmt: skip


def resolve(args: tuple, requested: str | None = None) -> Backend:
    """Pick the backend for one call. ``args`` = (x, weight, bias, lora_A, lora_B, lora_R, opts)."""
    if _is_compiling():  # traced once per graph: no cache state inside a graph
        return _resolve(args, requested)[0]
    key = _call_class(args, requested)
    backend = _resolve_cache.get(key)
    if backend is None:
        backend, cacheable = _resolve(args, requested)
        if cacheable:
            if len(_resolve_cache) >= _RESOLVE_CACHE_MAX:
                _resolve_cache.clear()
            _resolve_cache[key] = backend
    return backend


def _resolve(args: tuple, requested: str | None) -> tuple[Backend, bool]:
    """``(backend, cacheable)``: the choice, and whether only built-in backends were asked for it."""
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
        return backend, id(backend) in _BUILTIN_IDS
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
            asked = [_REGISTRY[n] for n, _ in skipped] + [backend]
            return backend, all(id(b) in _BUILTIN_IDS for b in asked)
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
    _BUILTIN.extend(_REGISTRY.values())
    _BUILTIN_IDS.update(id(b) for b in _BUILTIN)
    _load_entry_points()
    _resolve_cache.clear()
