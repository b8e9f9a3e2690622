"""What every backend shares, importing no backend: the call's options, the backend interface, the error.

A backend is a named object that answers two questions without side effects and does the work:

* ``availability()`` -> ``(ok, reason)``: can it run at all here (module importable, native build present)?
* ``supports(x, weight, bias, lora_A, lora_B, lora_R, opts)`` -> ``(ok, reason)``: can it run *this* call
  (device, dtype, rank, features)? Called with validated arguments (lora_kernels.functional.validate).
* ``apply(x, weight, bias, lora_A, lora_B, lora_R, opts)`` -> ``y``, differentiable in every tensor argument.

``auto_priority`` places the backend in ``auto``'s order per device type (lower runs first; a device type it
does not name is never tried by ``auto``, though an explicit request still reaches it). The built-in order and
its shape rules are in :mod:`lora_kernels.backends.heuristics`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


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
    """One backend. The callables import their implementation on first call (so registering one is free)."""

    name: str
    apply_fn: Callable
    availability_fn: Callable[[], tuple[bool, str]]
    supports_fn: Callable[..., tuple[bool, str]]
    auto_priority: Mapping[str, int] = field(default_factory=dict)  # device type -> rank in auto's order

    def availability(self) -> tuple[bool, str]:
        return self.availability_fn()

    def supports(self, *args) -> tuple[bool, str]:
        return self.supports_fn(*args)

    def apply(self, *args):
        return self.apply_fn(*args)
