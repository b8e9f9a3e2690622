"""Backend registry and selection: ``auto | torch | triton | cuda``.

A backend is a small object registered under a name. It answers two questions without side effects:

* ``availability()`` -> ``(ok, reason)``: can it run at all here (module importable, native build present)?
* ``supports(x, weight, bias, lora_A, lora_B, lora_R, opts)`` -> ``(ok, reason)``: can it run *this* call
  (device, dtype, rank, features)?

and does the work in ``apply(...)`` (an autograd-aware function returning ``y``).

Selection order for one call: the module's own choice, else the global one (``set_backend``), else the
environment variable ``LORA_KERNELS_BACKEND``, else ``auto``. An explicit name that cannot run raises
``BackendUnavailableError`` with the reason; ``auto`` walks ``AUTO_PREFERENCE`` for the tensors' device and logs
(once per distinct reason) every faster backend it skipped and why, so no fast path is lost silently.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("lora_kernels")

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
ENV_VAR = "LORA_KERNELS_BACKEND"

# Preference of ``auto`` per device type, fastest verified first, from the H200 runs committed under
# benchmarks/results/h200_20261130_run{4,5} (bf16, fp32 adapters, 4096 -> 4096, r=16, fwd+bwd do_bench medians):
#   M=8192, p=0   : torch 0.975 ms < triton 1.088 (library plan) < cuda 6.277   (base 0.823, PEFT 1.813)
#   M=8192, p=0.1 : triton 1.172 < cuda 9.720 < torch 10.18 (its pure-torch mask hash)   (base 0.791, PEFT 1.977)
#   M=16,   p=0   : triton 0.693 (fused plan) < torch 0.804 < cuda 0.961   (host-bound; base 0.091, PEFT 0.656)
# So on a GPU: without dropout at training sizes the cuBLAS-backed torch path wins; with dropout, or at small M,
# the Triton kernels win. The cuda backend passes every GPU test (run 4) but is slower everywhere, so it is last.
# Revisit these after each GPU benchmark run.
AUTO_PREFERENCE = {
    "cuda": ("triton", "torch", "cuda"),
    "cpu": ("torch",),
}
AUTO_GPU_NO_DROPOUT_MIN_M = 1024  # from this many rows, without dropout, `auto` tries torch first on a GPU


def _auto_order(device_type: str, args: tuple) -> tuple[str, ...]:
    order = AUTO_PREFERENCE.get(device_type, ("torch",))
    if device_type == "cuda":
        x, opts = args[0], args[-1]
        m = x.numel() // max(x.shape[-1], 1)
        if opts.dropout_p == 0 and m >= AUTO_GPU_NO_DROPOUT_MIN_M:
            order = ("torch",) + tuple(n for n in order if n != "torch")
    return order


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to fix it."""


@dataclass(frozen=True)
class LoRAOpts:
    """Non-tensor arguments of one fused LoRA call (kept together so signatures stay short)."""

    scale: float
    dropout_p: float = 0.0  # 0 when not training
    seed: int = 0  # dropout seed; ignored when dropout_p == 0
    offset: int = 0  # added to the element counter of the dropout hash
    deterministic: bool = False  # no atomics in backward: bit-reproducible gradients


@dataclass
class Backend:
    name: str
    # Each function imports its implementation module on first call with a plain `import` statement inside the
    # function body: `import lora_kernels` stays free of triton/_C, and torch.compile can trace through it.
    apply_fn: Callable
    availability_fn: Callable[[], tuple[bool, str]]
    supports_fn: Callable[..., tuple[bool, str]]

    def availability(self) -> tuple[bool, str]:
        return self.availability_fn()

    def supports(self, *args) -> tuple[bool, str]:
        return self.supports_fn(*args)

    def apply(self, *args):
        return self.apply_fn(*args)


_REGISTRY: dict[str, Backend] = {}
_global_choice: str | None = None
_lock = threading.Lock()
_logged: set[str] = set()


def _is_compiling() -> bool:
    import torch

    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


def register_backend(backend: Backend) -> None:
    if backend.name not in BACKEND_NAMES or backend.name == "auto":
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {backend.name!r}")
    _REGISTRY[backend.name] = backend


def _log_once(level: int, msg: str) -> None:
    if _is_compiling():
        return  # logged by the eager call that preceded compilation; no locks inside a traced graph
    with _lock:
        if msg in _logged:
            return
        _logged.add(msg)
    logger.log(level, msg)


def validate_backend_name(name: str, argname: str = "backend") -> str:
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise ValueError(f"{argname} must be one of {BACKEND_NAMES}, got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``None`` resets to the env var / ``auto``)."""
    global _global_choice
    _global_choice = None if name is None else validate_backend_name(name)
    if _global_choice not in (None, "auto"):
        ok, why = get(_global_choice).availability()
        if not ok:
            _global_choice = None
            raise BackendUnavailableError(f"backend {name!r} is not available: {why}")


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
        raise BackendUnavailableError(f"backend {name!r} is not registered in this build of lora_kernels")
    return _REGISTRY[name]


def resolve(args: tuple, requested: str | None = None) -> Backend:
    """Pick the backend for one call. ``args`` = (x, weight, bias, lora_A, lora_B, lora_R, opts)."""
    _ensure_registered()
    name = validate_backend_name(requested) if requested else get_backend()
    device_type = args[0].device.type
    if name != "auto":
        backend = get(name)
        ok, why = backend.availability()
        if ok:
            ok, why = backend.supports(*args)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} cannot run this call: {why}")
        _log_once(logging.INFO, f"lora_kernels: using backend {name!r} on {device_type} (explicitly selected)")
        return backend
    skipped = []
    order = _auto_order(device_type, args)
    for cand in order:
        backend = _REGISTRY.get(cand)
        if backend is None:
            continue
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
    reasons = "; ".join(f"{n}: {w}" for n, w in skipped)
    raise BackendUnavailableError(f"no backend can run this call on {device_type}: {reasons}")


def backend_info() -> dict:
    """What each backend can do here, and what is configured. Cheap; never initialises CUDA."""
    _ensure_registered()
    info = {"configured": get_backend(), "auto_preference": AUTO_PREFERENCE, "backends": {}}
    for name, backend in _REGISTRY.items():
        ok, why = backend.availability()
        info["backends"][name] = {"available": ok, "reason": why}
    return info


_registered = False


def _ensure_registered() -> None:
    """Register the built-in backends (their modules import lazily, so this stays cheap)."""
    global _registered
    if _registered:
        return
    _registered = True
    from . import _builtin_backends

    _builtin_backends.register_all()
