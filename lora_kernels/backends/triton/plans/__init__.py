"""The Triton backend's plans: how many launches a direction takes, and which work goes to library GEMMs.

Each plan is a module with ``forward(...) -> (y, xa)`` and ``backward(...) -> (dx, flat)`` (the contract of
lora_kernels.backends.opdef) and the config kinds it tunes (``KINDS``):

=========  ==========================================  =============================================================
plan       forward                                     backward
=========  ==========================================  =============================================================
fused      1 launch (XA inside the GEMM's K-loop)      1 launch (GB inside the dX GEMM's N-loop), 2 deterministic
split      xa launch + GEMM launch with LoRA epilogue  as fused
library    xa launch + cuBLAS GEMM + rank-r ``addmm_``  cuBLAS ``dX = G W`` + xa launch for GB + 1 epilogue launch
=========  ==========================================  =============================================================

``auto`` picks fused for decode sizes (host-bound: one launch wins) and library above (:func:`auto_plan`); the
measurements behind it are in NOTES.md ("Plans"). A new plan: a module here with ``forward``/``backward``/``KINDS``,
an entry in ``PLANS``, its config rows in ``configs.py``, a row in the test matrix (tests/test_triton_kernels.py
``test_plans_match_oracle``), and a line in NOTES.md.
"""

from __future__ import annotations

import contextlib
import os

from . import fused, library, split

PLANS = {"fused": fused, "split": split, "library": library}
PLAN_NAMES = ("auto", *PLANS)
PLAN_ENV = "LORA_KERNELS_TRITON_FWD_PLAN"
AUTO_LIBRARY_MIN_M = 65  # auto: fused up to 64 rows, library from 65 (NOTES.md "Plans")
_plan: str | None = None


def auto_plan(m: int, dropout_p: float = 0.0) -> str:
    """The plan ``auto`` runs for ``m`` rows (``dropout_p`` is kept for a future rule)."""
    return "library" if m >= AUTO_LIBRARY_MIN_M else "fused"


def resolve_plan(plan: str, m: int, dropout_p: float = 0.0) -> str:
    """The concrete plan for one call: ``auto`` resolves to :func:`auto_plan`, a plan name to itself."""
    return auto_plan(m, dropout_p) if plan == "auto" else plan


def set_forward_plan(plan: str | None) -> None:
    """``"auto"`` (default), ``"fused"``, ``"split"`` or ``"library"``; ``None`` = env / default. The backward of a
    call follows the plan its forward ran."""
    global _plan
    if plan is not None and plan not in PLAN_NAMES:
        raise ValueError(f"forward plan must be one of {PLAN_NAMES}, got {plan!r}")
    _plan = plan


@contextlib.contextmanager
def forward_plan(plan: str | None):
    """``with forward_plan("library"): ...``: :func:`set_forward_plan` for the block, the previous choice after."""
    global _plan
    saved = _plan
    set_forward_plan(plan)
    try:
        yield
    finally:
        _plan = saved


def get_forward_plan() -> str:
    if _plan is not None:
        return _plan
    env = os.environ.get(PLAN_ENV, "auto")
    if env not in PLAN_NAMES:
        raise ValueError(f"environment variable {PLAN_ENV} must be one of {PLAN_NAMES}, got {env!r}")
    return env
