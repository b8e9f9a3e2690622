"""Forward GEMM with the LoRA epilogue: ``Y = X Wᵀ + b + s·XA [Rᵀ] Bᵀ``, one launch per plan step.

Shapes: ``X [M, K]`` (any strides; leading dims collapsed to two levels, see launch.rows_view), ``W [N, K]``,
``A [r, K]``, ``B [N, r]``, ``Y [M, N]``, ``XA [M, r]`` (fp32). The rank is padded inside the kernel to
``R_PAD = max(16, next_pow2(r))`` with masked loads (tl.dot needs every dim >= 16); A and B are never copied.

Program ``(pid_m, pid_n)`` owns a ``[BM, BN]`` tile of Y::

    acc = 0 [BM, BN] fp32 ; xa = 0 [BM, R_PAD] fp32
    for k in range(0, K, BK):
        x  = X[m-tile, k:k+BK]                        # loaded once, used twice when FUSE_XA
        acc += x @ Wᵀ[k:k+BK, n-tile]                 # the base GEMM
        if FUSE_XA:                                   # fused plan: XA in the K-loop (one launch in all)
            xd = x ⊙ Z[m-tile, k:k+BK]                # mask regenerated from (seed, offset, m*K+k): never stored
            xa += xd @ Aᵀ[k:k+BK, :R_PAD]             # extra MMA work: R_PAD/BN of the base (16/128 = 12.5%)
    if not FUSE_XA: xa = XA[m-tile]                   # split plan: XA from the xa launch (kernels/xa.py)
    if HAS_R: xr = xa @ Rᵀ  else: xr = xa           # lora_R: the subspace method's [r, r] middle matrix
    acc += (s·xr) @ Bᵀ[:R_PAD, n-tile] + b[n-tile]
    Y[m-tile, n-tile] = acc  (cast to the activation dtype at the store)
    if FUSE_XA and pid_n == 0: XA[m-tile, :r] = xa   (fp32; every column computes the same xa, one stores it)

Adding ``(s·XA) Bᵀ`` in the epilogue or initialising the accumulator with it is the same sum.

Precision: all products accumulate in fp32. Operands go to tl.dot in the activation dtype (fp32 adapters are
cast in-kernel to it, as PEFT/torch do), ``xa`` is rounded to it once for the epilogue product (torch rounds
XA to it too). fp32 activations use IEEE fp32 products (see common.dot).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import cast, dot, row_offsets, tile_ids
from .rng import keep_mask


@triton.jit(do_not_specialize=["drop_offset", "key_lo", "key_hi", "drop_threshold"])
def lora_fwd_kernel(
    # pointers
    x_ptr,
    w_ptr,
    bias_ptr,  # unused unless HAS_BIAS
    a_ptr,
    b_ptr,
    rm_ptr,  # lora_R [r, r], unused unless HAS_R
    y_ptr,
    xa_ptr,  # [M, R] fp32, contiguous: written (FUSE_XA) or read
    # sizes
    M,
    N,
    K,
    R,
    SEQ_X,  # rows of X are m = b*SEQ_X + i (see row_offsets)
    # strides
    stride_x_b,
    stride_x_m,
    stride_x_k,
    stride_w_n,
    stride_w_k,
    stride_a_r,
    stride_a_k,
    stride_b_n,
    stride_b_r,
    stride_rm_i,
    stride_rm_j,
    stride_y_m,
    stride_y_n,
    # scalars
    scale,
    drop_offset,  # added to the element counter m*K + k
    key_lo,  # dropout keys / threshold as int32 bit patterns (see rng.py)
    key_hi,
    drop_threshold,
    drop_scale,  # 1 / (1 - p)
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_R: tl.constexpr,
    FUSE_XA: tl.constexpr,  # fused plan: XA in the K-loop; else XA is read (split plan)
    R_PAD: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    dt = x_ptr.dtype.element_ty
    acc_t = xa_ptr.dtype.element_ty  # fp32 (fp64 for fp64 activations: gradcheck through the kernels)
    pid_m, pid_n = tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R
    x_rows = x_ptr + row_offsets(offs_m, SEQ_X, stride_x_b, stride_x_m)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=acc_t)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_x_k, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # Wᵀ tile [BK, BN]
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_w_n + offs_k[:, None] * stride_w_k,
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc = dot(x, w, acc, IEEE, INTERPRET)
        if FUSE_XA:
            xd = x
            if HAS_DROPOUT:
                keep = keep_mask(offs_m, offs_k, K, drop_offset, key_lo, key_hi, drop_threshold)
                xd = cast(tl.where(keep, x.to(acc_t) * drop_scale, 0.0), dt, INTERPRET)
            # Aᵀ tile [BK, R_PAD], rows r >= R masked to 0
            a = tl.load(
                a_ptr + offs_r[None, :] * stride_a_r + offs_k[:, None] * stride_a_k,
                mask=r_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            xa = dot(xd, cast(a, dt, INTERPRET), xa, IEEE, INTERPRET)

    xa_ptrs = xa_ptr + offs_m[:, None] * R + offs_r[None, :]
    if not FUSE_XA:  # split plan: XA comes from the xa launch
        xa = tl.load(xa_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    # Bᵀ tile [R_PAD, BN]
    bt = tl.load(
        b_ptr + offs_n[None, :] * stride_b_n + offs_r[:, None] * stride_b_r,
        mask=n_mask[None, :] & r_mask[:, None],
        other=0.0,
    )
    xr = xa
    if HAS_R:  # XA Rᵀ: Rᵀ tile [R_PAD, R_PAD], element (j, i) = R[i, j]
        rt = tl.load(
            rm_ptr + offs_r[None, :] * stride_rm_i + offs_r[:, None] * stride_rm_j,
            mask=r_mask[None, :] & r_mask[:, None],
            other=0.0,
        )
        xr = dot(cast(xa, dt, INTERPRET), cast(rt, dt, INTERPRET), tl.zeros_like(xa), IEEE, INTERPRET)
    acc = dot(cast(xr * scale, dt, INTERPRET), cast(bt, dt, INTERPRET), acc, IEEE, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(acc_t)[None, :]
    tl.store(
        y_ptr + offs_m.to(tl.int64)[:, None] * stride_y_m + offs_n[None, :] * stride_y_n,
        cast(acc, y_ptr.dtype.element_ty, INTERPRET),
        mask=m_mask[:, None] & n_mask[None, :],
    )
    if FUSE_XA:
        if pid_n == 0:
            tl.store(xa_ptrs, xa, mask=m_mask[:, None] & r_mask[None, :])
