"""The Triton backend's op: the plans (plans/) behind the shared op contract (lora_kernels.backends.opdef).

    lora_kernels::triton_lora_fwd(x, weight, bias?, A, B, R?, scale, p, seed, offset, deterministic, plan)
    lora_kernels::triton_lora_bwd(g, x, weight, A, B, R?, xa, scale, p, seed, offset, needs..., det, plan)

``plan`` ``"auto"`` resolves to the process-wide choice (``set_forward_plan`` / ``LORA_KERNELS_TRITON_FWD_PLAN``)
and, when that is ``auto`` too, to :func:`plans.auto_plan` for the call's row count. The backward runs the plan
its forward ran (recorded by the op's autograd context).
"""

from __future__ import annotations

from ..opdef import define_lora_op
from . import plans


class TritonKernels:
    """opdef.Kernels for the Triton plans."""

    def resolve_plan(self, plan: str, m: int, dropout_p: float) -> str:
        if plan == "auto":
            plan = plans.get_forward_plan()
        if plan not in plans.PLAN_NAMES:
            raise ValueError(f"plan must be one of {plans.PLAN_NAMES}, got {plan!r}")
        return plans.resolve_plan(plan, m, dropout_p)

    def forward(self, x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, plan):
        return plans.PLANS[plan].forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset)

    def backward(self, g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset, need_dx, need_da,
                 need_db, need_dbias, need_dr, deterministic, plan):  # fmt: skip
        return plans.PLANS[plan].backward(g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset,
                                          need_dx, need_da, need_db, need_dbias, need_dr, deterministic)  # fmt: skip


TRITON_OP = define_lora_op("triton", TritonKernels())
lora_fwd = TRITON_OP.fwd
lora_bwd = TRITON_OP.bwd
