"""Backward kernel: ``dX``, ``dA``, ``dB``, ``db`` (and ``dR``) in one launch (two in deterministic mode).

Chain rule (DESIGN.md), ``G = dY [M, N]``, ``Z`` the forward's dropout mask (regenerated, never stored),
optional middle matrix ``R [r, r]`` (identity when absent; HAS_R)::

    GB  = G B                   [M, r]
    GBR = GB R                  [M, r]
    dX  = G W + s·(GBR A) ⊙ Z   [M, K]
    dA  = s·GBRᵀ (X ⊙ Z)        [r, K]
    dB  = s·Gᵀ (XA Rᵀ)          [N, r]     XA saved by the forward (fp32)
    dR  = s·GBᵀ XA              [r, r]     added by the programs of k-column 0
    db  = Σ_rows G              [N]

Program ``(pid_m, pid_k)`` owns a ``[BM, BK]`` tile of dX and walks all of N, so its rows' GB is complete
inside the program::

    acc = 0 [BM, BK] ; gb = 0 [BM, R_PAD]          (fp32)
    for j in range(cdiv(N, BN)):
        g = G[m-tile, j-tile]
        acc += g @ W[j-tile, k-tile]                # the base GEMM  (NEED_DX)
        gb  += g @ B[j-tile, :R_PAD]                # same g tile; extra MMA work R_PAD/BK
    for j in range(pid_k, cdiv(N, BN), num_pid_k):  # dB / db work spread evenly over the k-columns
        g = G[m-tile, j-tile]
        dB[j-tile, :]  += gᵀ @ (s·XA Rᵀ)[m-tile, :]        (atomic, or a store into this row-tile's partial)
        db[j-tile]     += Σ_rows g
    if HAS_R: dR += (s·gb)ᵀ @ XA[m-tile] (pid_k == 0) ;  gb = gb @ R
    Z = mask(m-tile, k-tile)
    dX[m-tile, k-tile] = acc + (s·gb @ A[:, k-tile]) ⊙ Z
    dA[:, k-tile]     += (s·gb)ᵀ @ (X[m-tile, k-tile] ⊙ Z)

Library plan (PRE_GW, plans/library.py): the base GEMM ``G W`` is a library GEMM (cuBLAS) written into dX
and ``GB`` comes from the xa kernel (kernels/xa.py) run on (G, Bᵀ); this kernel then skips the N loop,
starts ``acc`` from dX's tile and ``gb`` from GB, and does everything else as above: the mask, dX's LoRA term,
dA, dB, db and dR, reading X, dX and G once each.

dA/dB/db accumulate in fp32 into one flat buffer (layout: backends/opdef.grad_layout). Atomic mode
(DETERMINISTIC=0): ``tl.atomic_add`` into a zeroed buffer, 1 launch (+ the torch.zeros memset, which is not one
of our kernels but is a device op: counted honestly in NOTES.md). Deterministic mode: each row-tile ``pid_m``
stores its partial sums at ``flat + pid_m * stride_part`` (every element written exactly once), and
``sum_partials_kernel`` adds the row-tiles in a fixed order: 2 launches, bit-reproducible, extra memory
``cdiv(M, BM) * (rK + Nr + N) * 4`` bytes (64 * 131k * 4 = 34 MB at M=8192, K=N=4096, r=16, BM=128).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import cast, dot, row_offsets, tile_ids
from .rng import keep_mask


@triton.jit
def _accumulate(ptrs, val, mask, DETERMINISTIC: tl.constexpr):
    if DETERMINISTIC:
        tl.store(ptrs, val, mask=mask)
    else:
        tl.atomic_add(ptrs, val, mask=mask)


@triton.jit(do_not_specialize=["drop_offset", "key_lo", "key_hi", "drop_threshold"])
def lora_bwd_kernel(
    # pointers
    g_ptr,
    x_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    rm_ptr,  # lora_R [r, r], unused unless HAS_R
    xa_ptr,  # [M, R] fp32 contiguous, from the forward
    gb_ptr,  # [M, R] fp32 contiguous: G B (PRE_GW only)
    dx_ptr,  # [M, K] activation dtype; holds G W on entry when PRE_GW
    da_ptr,  # fp32 [R, K] (row-major) inside the flat gradient buffer
    db_ptr,  # fp32 [N, R]
    dbias_ptr,  # fp32 [N]
    drm_ptr,  # fp32 [R, R]
    # sizes
    M,
    N,
    K,
    R,
    SEQ_G,  # rows are m = b*SEQ + i for G and X (see row_offsets)
    SEQ_X,
    # strides
    stride_g_b,
    stride_g_m,
    stride_g_n,
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
    stride_dx_m,
    stride_dx_k,
    stride_part,  # elements between two row-tiles' partial sums (DETERMINISTIC); unused with atomics
    # scalars
    scale,
    drop_offset,
    key_lo,
    key_hi,
    drop_threshold,
    drop_scale,
    # meta-parameters
    NEED_DX: tl.constexpr,
    NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    NEED_DR: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    PRE_GW: tl.constexpr,  # library plan: G W is in dX already and G B in gb_ptr (module docstring)
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
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_k, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    k_mask = offs_k < K
    r_mask = offs_r < R
    g_rows = g_ptr + row_offsets(offs_m, SEQ_G, stride_g_b, stride_g_m)[:, None]
    if DETERMINISTIC:
        part = pid_m.to(tl.int64) * stride_part
        da_ptr += part
        db_ptr += part
        dbias_ptr += part
        drm_ptr += part

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=acc_t)
    gb = tl.zeros((BLOCK_M, R_PAD), dtype=acc_t)
    if HAS_R:  # R tile [R_PAD, R_PAD]
        rm = tl.load(
            rm_ptr + offs_r[:, None] * stride_rm_i + offs_r[None, :] * stride_rm_j,
            mask=r_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        rm = cast(rm, dt, INTERPRET)
    if NEED_DB or NEED_DR:
        xa = tl.load(xa_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    if NEED_DB:
        xr = xa
        if HAS_R:  # XA Rᵀ
            xr = dot(cast(xa, dt, INTERPRET), tl.trans(rm), tl.zeros((BLOCK_M, R_PAD), dtype=acc_t), IEEE, INTERPRET)
        xr = cast(xr * scale, dt, INTERPRET)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dx_m + offs_k[None, :] * stride_dx_k
    if PRE_GW:
        if NEED_DX:
            acc = tl.load(dx_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(acc_t)
        if NEED_DX or NEED_DA or NEED_DR:
            gb = tl.load(
                gb_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0
            )
    elif NEED_DX or NEED_DA or NEED_DR:
        for j in range(0, tl.cdiv(N, BLOCK_N)):
            offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            g = tl.load(g_rows + offs_n[None, :] * stride_g_n, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            if NEED_DX:
                w = tl.load(
                    w_ptr + offs_n[:, None] * stride_w_n + offs_k[None, :] * stride_w_k,
                    mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                acc = dot(g, w, acc, IEEE, INTERPRET)
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_b_n + offs_r[None, :] * stride_b_r,
                mask=n_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            gb = dot(g, cast(b, dt, INTERPRET), gb, IEEE, INTERPRET)

    if NEED_DB or NEED_DBIAS:
        # dB / db: N-tile j belongs to k-column j % num_pid_k, so the work is spread evenly and each
        # (row-tile, N-tile) partial is produced exactly once. A separate loop (re-reading those G tiles: +1 read
        # of G in total against K/BK reads by the main loop, 3% at K=4096, BK=128) keeps the main loop free of
        # branches and atomics, which the software pipeliner needs to multi-buffer its loads.
        for j in range(pid_k, tl.cdiv(N, BLOCK_N), num_pid_k):
            offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            g = tl.load(g_rows + offs_n[None, :] * stride_g_n, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            if NEED_DB:
                part_b = dot(tl.trans(g), xr, tl.zeros((BLOCK_N, R_PAD), dtype=acc_t), IEEE, INTERPRET)
                _accumulate(
                    db_ptr + offs_n[:, None] * R + offs_r[None, :],
                    part_b,
                    n_mask[:, None] & r_mask[None, :],
                    DETERMINISTIC,
                )
            if NEED_DBIAS:
                _accumulate(dbias_ptr + offs_n, tl.sum(g.to(acc_t), axis=0), n_mask, DETERMINISTIC)

    if NEED_DR:
        if pid_k == 0:  # dR = s·GBᵀ XA: GB is complete in every k-column; column 0 contributes it
            part_r = dot(
                tl.trans(cast(gb * scale, dt, INTERPRET)),
                cast(xa, dt, INTERPRET),
                tl.zeros((R_PAD, R_PAD), dtype=acc_t),
                IEEE,
                INTERPRET,
            )
            _accumulate(
                drm_ptr + offs_r[:, None] * R + offs_r[None, :],
                part_r,
                r_mask[:, None] & r_mask[None, :],
                DETERMINISTIC,
            )
    if NEED_DX or NEED_DA:
        if HAS_R:  # GBR = GB R
            gb = dot(cast(gb, dt, INTERPRET), rm, tl.zeros((BLOCK_M, R_PAD), dtype=acc_t), IEEE, INTERPRET)
        gb = cast(gb * scale, dt, INTERPRET)
        if HAS_DROPOUT:
            keep = keep_mask(offs_m, offs_k, K, drop_offset, key_lo, key_hi, drop_threshold)
    if NEED_DX:
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_a_r + offs_k[None, :] * stride_a_k,
            mask=r_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        lora = dot(gb, cast(a, dt, INTERPRET), tl.zeros((BLOCK_M, BLOCK_K), dtype=acc_t), IEEE, INTERPRET)
        if HAS_DROPOUT:
            lora = tl.where(keep, lora * drop_scale, 0.0)
        tl.store(
            dx_ptrs,
            cast(acc + lora, dx_ptr.dtype.element_ty, INTERPRET),
            mask=m_mask[:, None] & k_mask[None, :],
        )
    if NEED_DA:
        x_rows = x_ptr + row_offsets(offs_m, SEQ_X, stride_x_b, stride_x_m)[:, None]
        x = tl.load(x_rows + offs_k[None, :] * stride_x_k, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            x = cast(tl.where(keep, x.to(acc_t) * drop_scale, 0.0), dt, INTERPRET)
        part_a = dot(tl.trans(gb), x, tl.zeros((R_PAD, BLOCK_K), dtype=acc_t), IEEE, INTERPRET)
        _accumulate(
            da_ptr + offs_r[:, None] * K + offs_k[None, :], part_a, r_mask[:, None] & k_mask[None, :], DETERMINISTIC
        )


@triton.jit
def sum_partials_kernel(
    # pointers
    part_ptr,  # [T, L] partial sums (fp32; fp64 for fp64 activations), row stride stride_part
    out_ptr,  # [L], same dtype
    # sizes
    T,
    L,
    # strides
    stride_part,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    """Deterministic second launch: ``out[i] = Σ_t part[t, i]`` in the fixed order t = 0, 1, ..."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
    for t in range(0, T):
        acc += tl.load(part_ptr + t * stride_part + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)
