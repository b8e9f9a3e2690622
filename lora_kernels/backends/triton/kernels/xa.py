"""Rank-r row reduction: ``OUT = (X ⊙ Z) Aᵀ``, ``[M, K] x [r, K]ᵀ -> [M, r]`` (fp32), one program per row-tile.

The memory-bound launch of the split and library plans: it streams ``X`` once and never touches ``W``. Used for

* ``XA = dropout(X) Aᵀ``  (forward; the mask regenerated from (seed, offset, m*K + k), never stored),
* ``GB = G B``            (library backward: rows = G, A := Bᵀ),
* ``dB = Gᵀ (s·XA)``      (library backward's dB-by-launch mode: rows = Gᵀ, A := (s·XA)ᵀ).

Program ``pid`` owns rows ``[pid*BM, (pid+1)*BM)``::

    acc = 0 [BM, R_PAD] fp32
    for k in range(0, K, BK):
        x = X[m-tile, k:k+BK]                      # read through strides (any two-level row layout)
        if HAS_DROPOUT: x = x ⊙ Z[m-tile, k:k+BK]
        acc += x @ Aᵀ[k:k+BK, :R_PAD]              # A cast in-kernel to X's dtype, rows r >= R masked to 0
    OUT[m-tile, :R] = acc                          # row-major, row stride R

The rank is padded to ``R_PAD = max(16, next_pow2(r))`` with masked loads (tl.dot needs every dim >= 16).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import cast, dot, row_offsets
from .rng import keep_mask


@triton.jit(do_not_specialize=["drop_offset", "key_lo", "key_hi", "drop_threshold"])
def lora_xa_kernel(
    # pointers
    x_ptr,
    a_ptr,
    out_ptr,  # [M, R] fp32 (fp64 for fp64 X), contiguous
    # sizes
    M,
    K,
    R,
    SEQ_X,  # rows of X are m = b*SEQ_X + i (see row_offsets)
    # strides
    stride_x_b,
    stride_x_m,
    stride_x_k,
    stride_a_r,
    stride_a_k,
    # scalars
    drop_offset,  # added to the element counter m*K + k
    key_lo,  # dropout keys / threshold as int32 bit patterns (see rng.py)
    key_hi,
    drop_threshold,
    drop_scale,  # 1 / (1 - p)
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    dt = x_ptr.dtype.element_ty
    acc_t = out_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    r_mask = offs_r < R
    x_rows = x_ptr + row_offsets(offs_m, SEQ_X, stride_x_b, stride_x_m)[:, None]
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=acc_t)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_x_k, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_mask(offs_m, offs_k, K, drop_offset, key_lo, key_hi, drop_threshold)
            x = cast(tl.where(keep, x.to(acc_t) * drop_scale, 0.0), dt, INTERPRET)
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_a_r + offs_k[:, None] * stride_a_k,
            mask=r_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc = dot(x, cast(a, dt, INTERPRET), acc, IEEE, INTERPRET)
    tl.store(out_ptr + offs_m[:, None] * R + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])
