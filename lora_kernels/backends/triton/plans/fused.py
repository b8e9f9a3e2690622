"""Plan ``fused`` (DESIGN.md's launch budget): one launch forward, one launch backward (two deterministic).

Forward: the GEMM kernel with ``FUSE_XA`` (kernels/gemm.py): every ``[BM, BN]`` program of Y accumulates its
rows' XA from the X tiles of the base GEMM's K-loop, so XA is computed ``N/BN`` times (and the dropout hash with
it): the right trade where launches dominate (decode sizes), not at training sizes (NOTES.md "Plans").
Backward: kernels/backward.py without PRE_GW: every ``[BM, BK]`` program of dX walks all of N for ``G W`` and
accumulates ``G B`` from the same G tiles, then adds the LoRA terms and the dA/dB/db partials.
"""

from __future__ import annotations

from ..launch import aligned, device_guard
from .common import backward_outputs, dropout_tuple, forward_outputs, run_backward, run_gemm

KINDS = ("fwd", "bwd")


def forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset):
    y, xa, ready = forward_outputs(x, weight, lora_A)
    if ready:
        return y, xa
    drop = dropout_tuple(dropout_p, seed, offset)
    ok = aligned((weight.shape[0],), x, weight, lora_A, lora_B, lora_R)  # N: Y's row stride
    with device_guard(x):
        run_gemm(x, weight, bias, lora_A, lora_B, lora_R, y, xa, scale, drop, True, ok, "fwd0")
    return y, xa


def backward(g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset, need_dx, need_da, need_db,
             need_dbias, need_dr, deterministic):  # fmt: skip
    dx, flat, needs = backward_outputs(g, x, weight, lora_A, lora_R, (need_dx, need_da, need_db, need_dbias, need_dr))
    if flat is not None:
        return dx, flat
    k = x.shape[-1]
    dx2 = dx.view(-1, k) if need_dx else g  # any valid pointer when dX is not needed
    ok = aligned((k,), g, x, weight, lora_A, lora_B, lora_R)  # K: dX's row stride
    drop = dropout_tuple(dropout_p, seed, offset)
    with device_guard(x):
        flat = run_backward(g, x, weight, lora_A, lora_B, lora_R, xa, None, dx2, scale, drop, needs, deterministic,
                            ok, "bwd")  # fmt: skip
    return dx, flat
