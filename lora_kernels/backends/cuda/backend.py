"""The ``cuda`` backend's registry hooks: availability, ``supports`` and ``apply`` (the op itself: ``ops.py``).

The binding ``lora_kernels._C`` (csrc/) links no libtorch: ``ops.py`` hands it each tensor's ``data_ptr()``,
sizes, element strides, a dtype code, the device index and the current stream as plain ints, and registers the
kernels through the shared op contract (lora_kernels.backends.opdef), so ``torch.compile`` traces them.

Main loop: ``LORA_KERNELS_CUDA_KERNEL=simple|pipelined`` (read by the extension at every call; default
``lora_kernels._C.DEFAULT_KERNEL``). ``pipelined`` (cp.async ring + mma.sync, csrc/lora_pipe.cuh) runs for fp16/bf16
with r <= 64 and 16-byte aligned rows, the simple kernels otherwise; ``last_path()`` says which ran and why.

Not supported (``supports`` says so and ``auto`` moves on): the ``lora_R`` middle matrix, fp64, ranks above 256,
GPUs older than sm_80, 4-bit (bitsandbytes) bases.
"""

from __future__ import annotations

import torch

from ..base import LoRAOpts
from .native import _DTYPE_CODES, BUILD_HINT, MAX_RANK, _load_native, _require_native

__all__ = ["BUILD_HINT", "MAX_RANK", "_DTYPE_CODES", "apply", "availability", "last_path", "supports"]

# GPU verification record, updated by hand after a run of `pytest -m gpu tests/test_cuda_*.py` on a real GPU.
# None = never run on a GPU: the kernels compile (sm_80, sm_90) and the CPU-side checks pass, nothing more.
# `auto`'s order on a GPU is set from measurements in backends/heuristics.py (cuda is last: slowest today).
VERIFIED_ON_GPU: str | None = (
    "NVIDIA H200, 2026-11-30, run 4 (benchmarks/results/h200_20261130_run4, commit 647f198): every CUDA GPU test "
    "passes, simple and pipelined policies, incl. run 3's three dB failures at M=1 (fixed by rounding XA to the "
    "activation dtype before the dB product); compute-sanitizer memcheck 0 errors and racecheck 0 hazards on "
    "csrc/sanitize_check.py (both policies, fp32/bf16/fp16, atomic and deterministic). Runs 1 and 3 before it"
)


def availability() -> tuple[bool, str]:
    """Cheap: imports the extension (no CUDA call) and asks torch whether a device exists."""
    mod, err = _load_native()
    if mod is None:
        return False, f"lora_kernels._C not built: {BUILD_HINT} (import error: {err})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "lora_kernels._C is built and a CUDA device is present"


def supports(x, weight, bias, lora_A, lora_B, lora_R, opts) -> tuple[bool, str]:
    if not isinstance(weight, torch.Tensor):  # lora_kernels.quant.nf4.QuantWeight4bit
        return False, (
            "the CUDA C++ kernels have no 4-bit (bitsandbytes NF4/FP4) base yet: use backend 'triton' (GPU) or 'torch'"
        )
    if x.device.type != "cuda":
        return False, f"the CUDA kernels need CUDA tensors, got x on {x.device}"
    if x.dtype not in _DTYPE_CODES:
        return False, f"the CUDA kernels support float32/float16/bfloat16 activations, got {x.dtype}"
    if lora_R is not None:
        return False, "lora_R (middle r x r matrix) is not implemented in the CUDA kernels (use 'torch' or 'triton')"
    r = lora_A.shape[0]
    if r > MAX_RANK:
        return False, f"the CUDA kernels support ranks r <= {MAX_RANK}, got r={r}"
    major, minor = device_capability(x.device)
    if major < 8:
        return False, f"the CUDA kernels need compute capability >= 8.0 (bf16 tensor cores), got {major}.{minor}"
    return True, "fused CUDA kernels"


def last_path() -> dict[str, str]:
    """Which main loop the last forward / backward call took: ``{"fwd": ..., "bwd": ...}``, each ``"pipelined"``
    or ``"simple (<reason>)"`` (``"none"`` before the first call).

    The policy is ``LORA_KERNELS_CUDA_KERNEL=simple|pipelined`` (read by the extension at each call; default
    ``lora_kernels._C.DEFAULT_KERNEL``). ``pipelined`` (csrc/lora_pipe.cuh) is taken for fp16/bf16 with r <= 64 and
    16-byte aligned rows (unit inner stride; K, N, row strides multiples of 8); anything else runs the simple
    kernels and the reason is reported here, never silently.
    """
    return dict(_require_native().last_path())


_capabilities: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of ``device``, asked once per device (the driver call costs host time on every call)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capabilities.get(idx)
    if cap is None:
        cap = _capabilities[idx] = torch.cuda.get_device_capability(idx)
    return cap


def apply(x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> torch.Tensor:
    if lora_R is not None:  # resolve() checks supports() first; this guards direct calls
        raise ValueError("the cuda backend does not implement lora_R; use backend 'torch' or 'triton'")
    from .ops import CUDA_OP

    return CUDA_OP.apply(x, weight, bias, lora_A, lora_B, None, opts)
