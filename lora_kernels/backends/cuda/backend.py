"""The ``cuda`` backend's registry hooks: availability, ``supports`` and ``apply`` (the op itself: ``ops.py``).

The binding ``lora_kernels._C`` (csrc/) links no libtorch: ``ops.py`` hands it each tensor's ``data_ptr()``,
sizes, element strides, a dtype code, the device index and the current stream as plain ints, and registers the
kernels through the shared op contract (lora_kernels.backends.opdef), so ``torch.compile`` traces them.

Main loop: ``LORA_KERNELS_CUDA_KERNEL=simple|pipelined`` (read by the extension at every call; default
``lora_kernels._C.DEFAULT_KERNEL``). ``pipelined`` (cp.async ring + mma.sync, csrc/lora_pipe.cuh) runs for fp16/bf16
with r <= 64 and 16-byte aligned rows, the simple kernels otherwise; ``last_path()`` says which ran and why.

Plans (``ops.py``): ``fused`` (the one-launch kernels above) and ``cublas`` (lora_kernels._C_cublas: cuBLASLt GEMMs
plus rank-r kernels, r <= 64); :func:`plans_info` says which can run here, ``ops.last_plan()`` which ran.

Not supported (``supports`` says so and ``auto`` moves on): the ``lora_R`` middle matrix, fp64, ranks above 256,
GPUs older than sm_80, 4-bit (bitsandbytes) bases.
"""

from __future__ import annotations

import torch

from ..base import LoRAOpts
from . import cublas
from .native import _DTYPE_CODES, BUILD_HINT, MAX_RANK, _load_native, _require_native, device_capability

__all__ = [
    "BUILD_HINT",
    "MAX_RANK",
    "_DTYPE_CODES",
    "apply",
    "availability",
    "device_capability",
    "last_path",
    "plans_info",
    "supports",
]

# GPU verification record, updated by hand after a run of `pytest -m gpu tests/test_cuda_*.py` on a real GPU.
# None = never run on a GPU: the kernels compile (sm_80, sm_90) and the CPU-side checks pass, nothing more.
# `auto`'s order on a GPU is set from measurements in backends/heuristics.py (cuda is last: slowest today).
VERIFIED_ON_GPU: str | None = (
    "NVIDIA H200, 2026-11-30, run 4 (benchmarks/results/h200_20261130_run4, commit 647f198): every CUDA GPU test "
    "passes, simple and pipelined policies, incl. run 3's three dB failures at M=1 (fixed by rounding XA to the "
    "activation dtype before the dB product); compute-sanitizer memcheck 0 errors and racecheck 0 hazards on "
    "csrc/sanitize_check.py (both policies, fp32/bf16/fp16, atomic and deterministic). Runs 1 and 3 before it"
)
# Plan "cublas" (lora_kernels._C_cublas): compiled for sm_80/sm_90 and checked on CPU only (module import, argument
# validation, the no-GPU error, op registration); its GPU tests (tests/test_cuda_cublas.py) have not run yet.
VERIFIED_ON_GPU_CUBLAS: str | None = None


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


def plans_info() -> dict[str, dict]:
    """``{plan: {"available": bool, "reason": str}}`` for this machine (imports the modules, no CUDA call)."""
    ok, why = availability()
    cu_ok, cu_why = cublas.availability()
    return {
        "fused": {"available": ok, "reason": why},
        "cublas": {"available": ok and cu_ok, "reason": cu_why if ok or not cu_ok else f"{why} ({cu_why})"},
    }


def apply(x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> torch.Tensor:
    if lora_R is not None:  # resolve() checks supports() first; this guards direct calls
        raise ValueError("the cuda backend does not implement lora_R; use backend 'torch' or 'triton'")
    from .ops import CUDA_OP, choose_plan

    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    plan = choose_plan(m, lora_A.shape[0], opts.dropout_p)
    return CUDA_OP.apply(x, weight, bias, lora_A, lora_B, None, opts, plan)
