"""GEMM on a bitsandbytes 4-bit weight, dequantized tile by tile in registers: ``C = A op(W) [+ b + s·XR Bᵀ]``.

``W [N, K]`` exists only as its packed codes, the 16-value table and the fp32 per-block scales
(lora_kernels.quant.nf4 has the format: two codes per byte, element ``e = n*K + k`` in byte ``e // 2``, high nibble
for even ``e``, block ``e // blocksize``). One kernel serves both directions through the flat-index strides
``(stride_w_p, stride_w_q)`` of ``op(W)[q, p]``:

* forward ``Y = X Wᵀ``: ``A = X [M, K]``, ``op(W)[k, n] = W[n, k]`` at ``n*K + k``: strides ``(K, 1)``;
* backward ``dX = G W``: ``A = G [M, N]``, ``op(W)[n, k] = W[n, k]`` at ``n*K + k``: strides ``(1, K)``.

Program ``(pid_m, pid_p)`` owns a ``[BM, BP]`` tile of ``C [M, P]``::

    acc = 0 [BM, BP] fp32
    for q in range(0, Q, BQ):
        a   = A[m-tile, q:q+BQ]                                  any two-level row layout (launch.rows_view)
        e   = p * stride_w_p + q * stride_w_q                     [BQ, BP] flat element indices (int64)
        c   = (packed[e >> 1] >> (4 if e even else 0)) & 0xF      the 4-bit codes
        w   = cast(table[c] * scale[e // BLOCKSIZE], dtype)       fp32 product, one rounding: bitsandbytes' value
        acc += a @ w                                              fp32 accumulation
    if HAS_LORA: acc += (s·XR)[m-tile] @ Bᵀ[:, p-tile]            XR = XA [Rᵀ] (fp32, from the xa launch)
    if HAS_BIAS: acc += b[p-tile]
    C[m-tile, p-tile] = acc  (cast to the activation dtype at the store)

No full-precision ``W`` is ever written: each ``[BQ, BP]`` tile of it lives in registers for one step of the
loop. The table (64 bytes) and the scales (one per 64 weights at blocksize 64) are gathered through the cache;
blocks may span rows and a byte two rows, which the flat index handles. The rank-r work (XA with the dropout
mask, GB, dX's LoRA term, dA, dB, db) is done by the existing kernels (kernels/xa.py, kernels/backward.py), as in
the library plan, with this GEMM in place of the library's two.

Precision: as kernels/gemm.py (operands in the activation dtype, fp32 accumulation; the dequantized tile is
rounded once to the activation dtype, exactly the torch path's chunk, lora_kernels/backends/torch/qlora.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels.common import cast, dot, row_offsets, tile_ids


@triton.jit
def dequant_4bit(packed_ptr, code_ptr, absmax_ptr, idx, mask, BLOCKSIZE: tl.constexpr):
    """fp32 values of the weight elements at flat indices ``idx`` (int64), 0 where ``mask`` is off."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    codes = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    vals = tl.load(code_ptr + codes, mask=mask, other=0.0)
    scale = tl.load(absmax_ptr + idx // BLOCKSIZE, mask=mask, other=0.0)
    return vals * scale


@triton.jit
def nf4_gemm_kernel(
    # pointers
    a_ptr,
    packed_ptr,  # uint8 [ceil(N*K/2)]: the 4-bit codes
    code_ptr,  # fp32 [16]: the NF4 / FP4 table
    absmax_ptr,  # fp32 [ceil(N*K/BLOCKSIZE)]: per-block scales (nested ones dequantized by the host)
    c_ptr,  # [M, P] contiguous, the activation dtype
    bias_ptr,  # [P], unused unless HAS_BIAS
    xr_ptr,  # [M, R] fp32 contiguous: XA [Rᵀ], unused unless HAS_LORA
    b_ptr,  # lora_B [P, R], unused unless HAS_LORA
    # sizes
    M,
    P,
    Q,
    R,
    SEQ_A,  # rows of A are m = b*SEQ_A + i (see row_offsets)
    # strides
    stride_a_b,
    stride_a_m,
    stride_a_q,
    stride_w_p,  # flat-index strides of op(W)[q, p] (module docstring)
    stride_w_q,
    stride_b_n,
    stride_b_r,
    stride_c_m,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BLOCKSIZE: tl.constexpr,  # the quantization blocksize (a power of two: the division is a shift)
    R_PAD: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the P tile
    BLOCK_K: tl.constexpr,  # the Q step
    GROUP_M: tl.constexpr,
):
    dt = a_ptr.dtype.element_ty
    pid_m, pid_p = tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(P, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    p_mask = offs_p < P
    a_rows = a_ptr + row_offsets(offs_m, SEQ_A, stride_a_b, stride_a_m)[:, None]
    w_cols = offs_p.to(tl.int64)[None, :] * stride_w_p

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_K):
        offs_q = q0 + tl.arange(0, BLOCK_K)
        q_mask = offs_q < Q
        a = tl.load(a_rows + offs_q[None, :] * stride_a_q, mask=m_mask[:, None] & q_mask[None, :], other=0.0)
        idx = w_cols + offs_q.to(tl.int64)[:, None] * stride_w_q  # [BK, BN]
        w = dequant_4bit(packed_ptr, code_ptr, absmax_ptr, idx, q_mask[:, None] & p_mask[None, :], BLOCKSIZE)
        acc = dot(a, cast(w, dt, INTERPRET), acc, IEEE, INTERPRET)

    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        xr = tl.load(xr_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        # Bᵀ tile [R_PAD, BN]
        bt = tl.load(
            b_ptr + offs_p[None, :] * stride_b_n + offs_r[:, None] * stride_b_r,
            mask=p_mask[None, :] & r_mask[:, None],
            other=0.0,
        )
        acc = dot(cast(xr * scale, dt, INTERPRET), cast(bt, dt, INTERPRET), acc, IEEE, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        c_ptr + offs_m.to(tl.int64)[:, None] * stride_c_m + offs_p[None, :],
        cast(acc, c_ptr.dtype.element_ty, INTERPRET),
        mask=m_mask[:, None] & p_mask[None, :],
    )
