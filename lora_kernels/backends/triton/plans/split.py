"""Plan ``split`` (LoRAFusion's forward): an xa launch, then the GEMM launch with ``s·XA Bᵀ`` in its epilogue.

Forward: kernels/xa.py computes ``XA = dropout(X) Aᵀ`` once per element (no W traffic), then kernels/gemm.py
without ``FUSE_XA`` runs the plain GEMM and adds ``(s·XA) Bᵀ`` loaded from memory. Backward: the fused plan's
one-launch backward.
"""

from __future__ import annotations

from ..launch import aligned, device_guard
from .common import dropout_tuple, forward_outputs, run_gemm, run_xa
from .fused import backward

KINDS = ("fwd_xa", "fwd_gemm", "bwd")
__all__ = ["KINDS", "backward", "forward"]


def forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset):
    y, xa, ready = forward_outputs(x, weight, lora_A)
    if ready:
        return y, xa
    drop = dropout_tuple(dropout_p, seed, offset)
    ok = aligned((weight.shape[0],), x, weight, lora_A, lora_B, lora_R)  # N: Y's row stride
    with device_guard(x):
        run_xa(x, lora_A, xa, lora_A.shape[0], ok, "fwd2", drop)
        run_gemm(x, weight, bias, lora_A, lora_B, lora_R, y, xa, scale, drop, False, ok, "fwd1")
    return y, xa
