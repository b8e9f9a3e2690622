"""Plan ``library``: the two big GEMMs by the library (cuBLAS through torch), the rank-r and dropout work in Triton.

Forward: kernels/xa.py computes ``XA = dropout(X) Aᵀ`` (mask fused, never stored); ``Y = X Wᵀ (+ b)`` by the
library GEMM; ``Y += s·(XA [Rᵀ]) Bᵀ`` as a beta=1 ``addmm_`` (alpha = s: one read and write of Y, fp32
accumulation, one rounding). XA and B are rounded to the activation dtype as the fused kernel rounds them.

Backward: ``dX = G W`` by the library GEMM, written where the epilogue reads it; ``GB = G B`` by the xa kernel on
(G, Bᵀ); then one epilogue launch (kernels/backward.py with PRE_GW) adds dX's LoRA term under the regenerated mask
and accumulates dA, dB, db (and dR) while reading X, dX and G once each. Deterministic mode adds the fixed-order
partial sum. ``LORA_KERNELS_TRITON_LIBRARY_DB=launch`` (an experiment, NOTES.md "Next GPU run") computes
``dB = s·Gᵀ (XA [Rᵀ])`` with the xa kernel on (Gᵀ, (s·XA)ᵀ) and ``db`` with torch.sum instead (no atomics for them).
"""

from __future__ import annotations

import os

import torch

from ...opdef import acc_dtype, grad_layout
from ..launch import aligned, count_library, device_guard, rows2d, xa_rt
from .common import backward_outputs, dropout_tuple, forward_outputs, run_backward, run_xa

KINDS = ("fwd_xa", "bwd_epi")
LIBRARY_DB_ENV = "LORA_KERNELS_TRITON_LIBRARY_DB"


def forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset):
    y, xa, ready = forward_outputs(x, weight, lora_A)
    if ready:
        return y, xa
    n, dt = weight.shape[0], y.dtype
    ok = aligned((n,), x, weight, lora_A, lora_B, lora_R)  # N: Y's row stride
    with device_guard(x):
        run_xa(x, lora_A, xa, lora_A.shape[0], ok, "fwd2", dropout_tuple(dropout_p, seed, offset))
        x2, y2 = rows2d(x), y.view(-1, n)
        if bias is None:
            torch.mm(x2, weight.t(), out=y2)
        else:
            torch.addmm(bias, x2, weight.t(), out=y2)
        count_library("mm")
        y2.addmm_(xa_rt(xa, lora_R).to(dt), lora_B.t().to(dt), alpha=float(scale))
        count_library("addmm_")
    return y, xa


def db_mode() -> str:
    mode = os.environ.get(LIBRARY_DB_ENV, "epilogue")
    if mode not in ("epilogue", "launch"):
        raise ValueError(f"environment variable {LIBRARY_DB_ENV} must be 'epilogue' or 'launch', got {mode!r}")
    return mode


def backward(g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset, need_dx, need_da, need_db,
             need_dbias, need_dr, deterministic):  # fmt: skip
    dx, flat, needs = backward_outputs(g, x, weight, lora_A, lora_R, (need_dx, need_da, need_db, need_dbias, need_dr))
    if flat is not None:
        return dx, flat
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    m = xa.shape[0]
    dx2 = dx.view(m, k) if need_dx else g  # any valid pointer when dX is not needed
    ok = aligned((k,), g, x, weight, lora_A, lora_B, lora_R)  # K: dX's row stride
    by_launch = (needs[2] or needs[3]) and db_mode() == "launch"
    with device_guard(x):
        if need_dx:  # the base GEMM, written where the epilogue reads and finishes it
            torch.mm(rows2d(g), weight, out=dx2)
            count_library("mm")
        gb = None
        if need_dx or needs[1] or needs[4]:
            gb = torch.empty((m, r), dtype=acc_dtype(x.dtype), device=x.device)  # GB = G B: one launch, G read once
            run_xa(g, lora_B.t(), gb, r, ok, "gb")
        kernel_needs = (needs[0], needs[1], False, False, needs[4]) if by_launch else needs
        flat = run_backward(g, x, weight, lora_A, lora_B, lora_R, xa, gb, dx2, scale,
                            dropout_tuple(dropout_p, seed, offset), kernel_needs, deterministic, ok, "bwd_epi",
                            layout=needs[1:] if by_launch else None)  # fmt: skip
        if by_launch:  # after the sum: the partials' dB/db segments were never written, these stores replace them
            _db_by_launch(g, xa, lora_R, scale, flat, needs, r, k, n, ok)
    return dx, flat


def _db_by_launch(g, xa, lora_R, scale, flat, needs, r, k, n, ok) -> None:
    _, off_db, off_dbias, _, _ = grad_layout(r, k, n, *needs[1:])
    g2 = rows2d(g)
    if needs[2]:
        xr_s = xa_rt(xa, lora_R) * scale
        run_xa(g2.t(), xr_s.t(), flat[off_db : off_db + n * r], r, ok, "db")
    if needs[3]:
        torch.sum(g2, dim=0, dtype=flat.dtype, out=flat[off_dbias : off_dbias + n])
        count_library("sum")
