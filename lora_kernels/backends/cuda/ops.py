"""The CUDA backend's op: its plans behind the shared op contract (lora_kernels.backends.opdef).

    lora_kernels::cuda_lora_fwd / cuda_lora_bwd   (schema, fake and autograd from opdef)

=========  =====================================================  ===========================================
plan       forward                                                backward
=========  =====================================================  ===========================================
fused      1 launch (lora_kernels._C, csrc/lora_fwd.cu)           1 launch, 2 deterministic (csrc/lora_bwd.cu)
cublas     XA kernel, cuBLASLt Y = X Wᵀ, Y += b + s·XA Bᵀ          GB, cuBLASLt dX = G W, dX += LoRA term + dA, dB/db,
           (lora_kernels._C_cublas, csrc/cublas_plan.cu)          reduce (no atomics: always bit-reproducible)
=========  =====================================================  ===========================================

Which plan runs: :func:`set_plan` (``"auto"``, ``"fused"``, ``"cublas"``; ``None`` = environment / default), else
``LORA_KERNELS_CUDA_PLAN`` (read once, at the first call), else ``auto``. ``auto`` is :func:`auto_plan`: plan
``fused`` until a GPU run measures ``cublas`` (``AUTO_CUBLAS_MIN_M``, csrc/README.md "NOTES"), and ``fused`` for
what ``cublas`` cannot run (r > 64, the module not built); :func:`last_plan` says which plan the last call took
and why. The backend resolves the plan (it sees the rank) before calling the op; the backward runs the plan its
forward ran.
"""

from __future__ import annotations

import contextlib
import os

from ..base import BackendUnavailableError
from ..opdef import define_lora_op
from . import cublas, fused

PLANS = {"fused": fused, "cublas": cublas}
PLAN_NAMES = ("auto", *PLANS)
PLAN_ENV = "LORA_KERNELS_CUDA_PLAN"
# auto takes plan cublas from this many rows once a GPU run has measured it faster (None: never, until then)
AUTO_CUBLAS_MIN_M: int | None = None

_plan: str | None = None  # set_plan()
_env_plan: str | None = None  # LORA_KERNELS_CUDA_PLAN, read once
_last = {"plan": "none", "reason": "no call yet"}


def _read_env() -> str:
    global _env_plan
    if _env_plan is None:
        env = os.environ.get(PLAN_ENV, "auto") or "auto"
        if env not in PLAN_NAMES:
            raise ValueError(f"environment variable {PLAN_ENV} must be one of {PLAN_NAMES}, got {env!r}")
        _env_plan = env
    return _env_plan


def set_plan(plan: str | None) -> None:
    """``"auto"``, ``"fused"`` or ``"cublas"`` for every later call of this process; ``None``: back to
    ``LORA_KERNELS_CUDA_PLAN`` / ``auto``."""
    global _plan
    if plan is not None and plan not in PLAN_NAMES:
        raise ValueError(f"cuda plan must be one of {PLAN_NAMES}, got {plan!r}")
    _plan = plan


def get_plan() -> str:
    return _plan if _plan is not None else _read_env()


@contextlib.contextmanager
def plan(name: str | None):
    """``with plan("cublas"): ...``: :func:`set_plan` for the block, the previous choice after."""
    global _plan
    saved = _plan
    set_plan(name)
    try:
        yield
    finally:
        _plan = saved


def auto_plan(m: int, r: int | None = None) -> tuple[str, str]:
    """``(plan, reason)`` ``auto`` runs for ``m`` rows of rank ``r`` (None: unknown, e.g. a direct op call)."""
    if AUTO_CUBLAS_MIN_M is None:
        return "fused", "auto: plan 'cublas' not yet measured on a GPU (ops.AUTO_CUBLAS_MIN_M is None)"
    if m < AUTO_CUBLAS_MIN_M:
        return "fused", f"auto: {m} rows < AUTO_CUBLAS_MIN_M = {AUTO_CUBLAS_MIN_M}"
    if r is None:
        return "fused", "auto: rank unknown"
    ok, why = cublas.supports(r)
    return ("cublas", "auto: " + why) if ok else ("fused", "auto: " + why)


def choose_plan(m: int, r: int, dropout_p: float) -> str:
    """The plan for one call of ``m`` rows and rank ``r``; raises BackendUnavailableError when the requested plan
    cannot run it (an explicit plan never falls back silently). Recorded for :func:`last_plan`."""
    requested = get_plan()
    if requested == "auto":
        name, why = auto_plan(m, r)
    elif requested == "cublas":
        ok, why = cublas.supports(r)
        if not ok:
            raise BackendUnavailableError(f"cuda plan 'cublas' (requested) cannot run this call: {why}")
        name = "cublas"
    else:
        name, why = requested, "requested"
    _last["plan"], _last["reason"] = name, why
    return name


def last_plan() -> dict[str, str]:
    """``{"plan": ..., "reason": ...}`` of the last call resolved by :func:`choose_plan`."""
    return dict(_last)


class CudaKernels:
    """opdef.Kernels for the CUDA plans."""

    def resolve_plan(self, plan: str, m: int, dropout_p: float) -> str:
        if plan == "auto":
            return auto_plan(m)[0]
        if plan not in PLANS:
            raise ValueError(f"cuda plan must be one of {PLAN_NAMES}, got {plan!r}")
        return plan

    def forward(self, x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, plan):
        return PLANS[plan].forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset)

    def backward(self, g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset, need_dx, need_da,
                 need_db, need_dbias, need_dr, deterministic, plan):  # fmt: skip
        return PLANS[plan].backward(g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset,
                                    need_dx, need_da, need_db, need_dbias, need_dr, deterministic)  # fmt: skip


CUDA_OP = define_lora_op("cuda", CudaKernels())
lora_fwd = CUDA_OP.fwd
lora_bwd = CUDA_OP.bwd
