"""The correctness cross-check of every benchmark run (``benchmarks/bench_lora.py``; its docstring has the rule).

Each provider's forward output is compared with the torch backend in a higher precision on the same inputs, within
``2 x`` the eager composition's own error in the case's dtype plus half an ulp of the largest output.
"""

from __future__ import annotations

import dataclasses

import torch

from . import providers as P

CHECK_SEED = 1234  # fixed dropout seed for the cross-check of our backends


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any() or torch.isinf(out).any():
        return float("nan")
    return (out.double() - ref.double()).abs().max().item()


class Checker:
    """Reference outputs per dropout p for one case, and the derived tolerance."""

    def __init__(self, case: P.Case, inp: P.Inputs):
        from lora_kernels import lora_linear, lora_linear_reference

        self.case, self.inp = case, inp
        rd = torch.float64 if case.dtype in ("fp32", "fp64") else torch.float32
        self.refs: dict[float, tuple[torch.Tensor, float]] = {}
        ps = {0.0, case.dropout}
        with torch.no_grad():
            for p in ps:
                ref = lora_linear(
                    inp.x.to(rd), inp.weight.to(rd), None, inp.lora_A.to(rd), inp.lora_B.to(rd), inp.scale, p,
                    seed=CHECK_SEED, backend="torch",
                )  # fmt: skip
                eager = lora_linear_reference(
                    inp.x, inp.weight, None, inp.lora_A, inp.lora_B, inp.scale, p, seed=CHECK_SEED
                )
                eps = torch.finfo(case.torch_dtype).eps
                # 2 x the eager composition's own error in this dtype, plus half an ulp at the largest output.
                tol = 2.0 * _max_err(eager, ref) + 0.5 * eps * ref.abs().max().item()
                self.refs[p] = (ref, tol)

    def check(
        self, name: str, builder, own_rng: bool, has_lora: bool, activate=None
    ) -> tuple[float | None, float | None, str]:
        if not has_lora:
            return None, None, "n/a"
        case, inp = self.case, self.inp
        p = 0.0 if own_rng else case.dropout
        ref, tol = self.refs[p]
        with torch.no_grad():
            if own_rng:
                built = builder(inp, dataclasses.replace(case, dropout=0.0))
                out = built.forward(inp.x)
            else:
                out = _seeded_forward(name, case, inp, activate)
        err = _max_err(out, ref)
        ok = err == err and err <= tol  # NaN fails
        status = ("ok" if ok else "MISMATCH") + (" (p=0)" if own_rng and case.dropout > 0 else "")
        return err, tol, status


def _seeded_forward(name: str, case: P.Case, inp: P.Inputs, activate=None) -> torch.Tensor:
    from lora_kernels import lora_linear

    if activate is not None:
        activate()
    return lora_linear(
        inp.x, inp.weight, None, inp.lora_A, inp.lora_B, inp.scale, case.dropout, True, seed=CHECK_SEED,
        backend=name.split("-", 1)[0],
    )  # fmt: skip
