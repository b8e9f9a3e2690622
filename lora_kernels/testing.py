"""The project's tolerance rule for checking a result against the fp64 oracle, for the GPU scripts
(benchmarks/gpu_*.py, csrc/sanitize_check.py) and anything else that checks a backend outside pytest.

The FlashAttention rule: ``max|out - ref64| <= factor * max|torch_out - ref64| + atol_rel * max(max|ref64|, 1)``,
where ``torch_out`` is torch's own result in the same dtypes, so the bound comes from torch's error, not a guess.
``tests/helpers.py::assert_close_to_oracle`` asserts the same rule inside the test suite.
"""

from __future__ import annotations

import torch


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref|`` in fp64 (0 for empty tensors)."""
    return (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0


def oracle_tolerance(ref64: torch.Tensor, torch_out: torch.Tensor, factor: float = 2.0, atol_rel: float = 1e-6):
    """The bound ``out`` must meet: ``factor`` x torch's own error against ``ref64`` plus a relative atol."""
    scale = max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
    return factor * max_abs_err(torch_out, ref64) + atol_rel * scale


def oracle_check(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, **kw) -> tuple[bool, float, float]:
    """``(ok, err, tol)`` for ``out`` under :func:`oracle_tolerance`; a NaN anywhere in ``out`` fails."""
    err, tol = max_abs_err(out, ref64), oracle_tolerance(ref64, torch_out, **kw)
    ok = err <= tol and not bool(torch.isnan(out).any())
    return ok, err, tol
