"""``auto``'s choice as small pure functions of plain values (testable without a GPU, no tensors, no torch).

The built-in order per device type comes from the measurements in ``benchmarks/results/`` (the H200 runs and the
CPU table; ``lora_kernels/backends/triton/NOTES.md`` explains them); revisit it after each GPU benchmark run:

* CPU: only the pure-PyTorch backend (Triton runs on CPU only under its interpreter, for tests).
* CUDA: the Triton kernels first; without dropout at training sizes (``GPU_NO_DROPOUT_TORCH_MIN_M`` rows and more)
  the cuBLAS-backed torch path measured faster, so it goes first there; the CUDA C++ kernels are verified but
  measured slowest, so they come last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Rank of each built-in backend in auto's order per device type (lower first).
BUILTIN_PRIORITY: dict[str, dict[str, int]] = {
    "torch": {"cpu": 0, "cuda": 10},
    "triton": {"cuda": 0},
    "cuda": {"cuda": 20},
}
GPU_NO_DROPOUT_TORCH_MIN_M = 1024  # from this many rows, without dropout, auto tries torch first on a GPU


def rows_of(shape: Iterable[int]) -> int:
    """M of an ``[..., K]`` input: the product of the leading dimensions."""
    m = 1
    dims = tuple(shape)
    for d in dims[:-1]:
        m *= d
    return m


def auto_order(device_type: str, m: int, dropout_p: float, priorities: Mapping[str, Mapping[str, int]]) -> tuple:
    """The backends ``auto`` tries for one call, in order.

    ``priorities``: backend name -> {device type -> rank}, as registered; names without an entry for
    ``device_type`` are not tried. Ties keep registration order.
    """
    ranked = [(prio[device_type], i, name) for i, (name, prio) in enumerate(priorities.items()) if device_type in prio]
    order = tuple(name for _, _, name in sorted(ranked))
    if device_type == "cuda" and dropout_p == 0 and m >= GPU_NO_DROPOUT_TORCH_MIN_M and "torch" in order:
        order = ("torch",) + tuple(n for n in order if n != "torch")
    return order


def preference_table(priorities: Mapping[str, Mapping[str, int]]) -> dict[str, tuple]:
    """``{device type: names in base order}`` (before the shape rules), for ``backend_info()``."""
    devices = sorted({d for prio in priorities.values() for d in prio})
    return {d: auto_order(d, 0, 0.1, priorities) for d in devices}
