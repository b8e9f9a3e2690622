// The pipelined tensor-core main loop shared by the forward (Y = X Wᵀ, XA = Xd Aᵀ) and the backward
// (dX = G W, GB = G B) kernels: `mma.sync.m16n8k16` (fp16/bf16 -> fp32) on operands fed by `ldmatrix` from a padded
// shared layout, filled by 16-byte `cp.async.cg` copies in a STAGES-deep ring. fp16/bf16 only (sm_80+).
//
// One CTA of 8 warps owns a [BM=128, BN=128] output tile and walks the reduction dimension in steps of BK (32 with
// 4 stages by default, 64 with 3 stages on request, see Cfg):
//
//   prologue: stages 0..S-2 <- tiles 0..S-2                    (cp.async, one commit group per tile)
//   for kt in 0..KT-1:
//       wait_group(S-2); __syncthreads()                       tile kt has landed; stage (kt-1)%S is free
//       stage (kt+S-1)%S <- tile kt+S-1 (cp.async, commit)     the copy runs under the MMAs below
//       Lreg <- LoRA operand of tile kt+S-1 (plain loads)      fp32 or T adapters, converted to T
//       [hook_pre]  fwd with dropout: Xd <- Xs ⊙ Z / (1-p) (+ barrier)
//       acc  += Aop · Bopᵀ      warp (wm, wn) of the 2x4 grid owns rows 64*wm.., cols 32*wn.. (4x4 m16n8 frags)
//       accl += Aop' · Lᵀ       warp w owns rows 16*w.. of the [BM, RP] LoRA product (RP/8 m16n8 frags, RP <= 64)
//       stage (kt+S-1)%S.L <- Lreg                             plain stores, read after a later barrier
//       [hook_post] bwd, first column of CTAs: dB/db partials from the staged G tile
//
// Shared layout: every tile row is padded by 8 elements (16 bytes): a row of BK=32 16-bit elements becomes 80 bytes
// (BK=64: 144), so the 8 row addresses of one 8x8 ldmatrix land in 8 different 16-byte bank groups (80/16 = 5 and
// 144/16 = 9 are odd); the
// transposed W tile of the backward ([BK][BN+8], 272-byte rows, 272/16 = 17) likewise. No swizzle arithmetic.
//
// Operand layouts (both "reduction-contiguous" except the backward's W):
//   A operand (X or G): [rows m][red k], row stride sa, unit inner stride   -> ldmatrix.x4
//   B operand, kBTrans=false (forward W [N, K]):   [out n][red k]              -> ldmatrix.x4   (col-major B)
//   B operand, kBTrans=true  (backward W [N, K]):  [red n][out k]              -> ldmatrix.x4.trans
//   L operand (A [r, K] forward, Bᵀ of B [N, r] backward): [rank j][red k], staged by plain loads (dtype cast)
// Tails: cp.async with src-size 0 zero-fills rows/columns outside the matrix; the launcher only picks this loop when
// every 16-byte chunk is either fully inside or fully outside (reduction and row lengths multiples of 8, 16-byte
// aligned bases and row strides): otherwise the simple kernels run, and `last_path()` says why.
#pragma once

#include "lora_common.cuh"

namespace lora {
namespace pipe {

constexpr int BM = 128, BN = 128;
constexpr int RP_MAX = 64;  // LoRA ranks up to 64 (RP = r rounded up to 16); larger ranks use the simple kernels
constexpr int GROUP_M = 8;  // grid swizzle: 8 M-tiles share each W tile while it is in L2

// Reduction step BK (a template parameter; LORA_KERNELS_CUDA_BK=32|64 picks it at run time, default 32):
//   BK=32: 4 stages of ~24 KB (X/G 10 KB, W 10 / 8.5 KB, L 5 KB at RP=64): 96-100 KB ring, one barrier per 32.
//   BK=64: 3 stages of ~45 KB: 135-138 KB ring, half the barriers; the backward (170 KB with XA/GB) needs sm_90's
//          227 KB, so on sm_80 the launcher falls back to BK=32 (and says so).
// Either way 1 CTA (8 warps, ~200 registers each) per SM.
template <int kBK>
struct Cfg {
  static_assert(kBK == 32 || kBK == 64, "BK is 32 or 64");
  static constexpr int BK = kBK;
  static constexpr int STAGES = kBK == 32 ? 4 : 3;
  static constexpr int LDA = kBK + 8;  // 80 / 144-byte rows (odd multiples of 16): conflict-free ldmatrix, cp.async
  static constexpr int CPR = kBK / 8;  // 16-byte chunks per row of the A / forward-B tile
};

template <bool kBTrans, int kBK>
struct Layout {
  static constexpr int BK = kBK, LDA = Cfg<kBK>::LDA;
  static constexpr int LDB = kBTrans ? BN + 8 : BK + 8;
  static constexpr int A_ELEMS = BM * LDA;
  static constexpr int B_ELEMS = kBTrans ? BK * LDB : BN * LDB;
  static constexpr int L_ELEMS = RP_MAX * LDA;
  static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS + L_ELEMS;  // each part a multiple of 8 elements (16 bytes)
};

// ---- PTX wrappers
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy, L2 only (.cg); src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// d[16x8] (fp32) += a[16x16] · b[16x8], the m16n8k16 fragment layouts of the PTX ISA.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Grouped tile order (Triton's GROUP_M): consecutive CTAs walk GROUP_M row tiles of one column tile, so a wave of
// 132 CTAs reads ~8 row tiles and ~16 column tiles (a few MB) instead of sweeping all rows per column.
__device__ __forceinline__ void swizzle_tile(int pid, int tiles_m, int tiles_n, int& tm, int& tn) {
  const int width = GROUP_M * tiles_n;
  const int first = (pid / width) * GROUP_M;
  const int gsize = min(tiles_m - first, GROUP_M);
  tm = first + (pid % width) % gsize;
  tn = (pid % width) / gsize;
}

// Accumulators of one CTA's main loop, in registers. acc: the warp's 64x32 tile (mi: m16 row block, ni: n8 column
// block, 4 floats in the mma layout). accl: rows 16*warp.. of the [BM, RP] LoRA product (t: n8 rank block).
struct Acc {
  float c[4][4][4];
  float l[RP_MAX / 8][4];
};

struct LoopArgs {
  const void* a;  // A operand base, [rows][red], row stride sa
  int64_t sa, a_rows, m0;
  const void* b;  // B operand base: [out][red] (row stride sb) or, transposed, [red][out] (row stride sb)
  int64_t sb, b_out, n0;
  int64_t red;  // reduction length
  bool do_b;    // false: skip the B operand and the main MMAs (backward without dX)
  int rp;       // LoRA rank rounded up to 16, <= RP_MAX
};

// The main loop. `lora_val(j, kred) -> float` gives the LoRA operand (0 outside); `pre(As, kt) -> const T*` may
// build a transformed copy of the A tile for the LoRA MMA (returns nullptr to use As itself); `post(As, kt)` runs
// after the tile's MMAs (reads the staged A tile). Both hooks are called by all threads (they may hold barriers).
template <typename T, bool kBTrans, int kBK, class LoraVal, class Pre, class Post>
__device__ __forceinline__ void main_loop(Acc& acc, const LoopArgs& g, T* ring, LoraVal lora_val, Pre pre, Post post) {
  using Lay = Layout<kBTrans, kBK>;
  constexpr int LDB = Lay::LDB, BK = kBK, LDA = Cfg<kBK>::LDA, STAGES = Cfg<kBK>::STAGES, CPR = Cfg<kBK>::CPR;
  constexpr int CH = BM * CPR / kThreads;  // 16-byte chunks per thread per operand tile (2 or 4)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b);
  const int KT = static_cast<int>(cdiv(g.red, BK));
  const int l_count = g.rp * BK;  // LoRA operand elements per tile
  constexpr int L_PER_T = RP_MAX * BK / kThreads;

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc.c[i][j][q] = 0.0f;
#pragma unroll
  for (int t = 0; t < RP_MAX / 8; ++t)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc.l[t][q] = 0.0f;

  auto stage_a = [&](int s) { return ring + s * Lay::STAGE_ELEMS; };
  auto stage_b = [&](int s) { return ring + s * Lay::STAGE_ELEMS + Lay::A_ELEMS; };
  auto stage_l = [&](int s) { return ring + s * Lay::STAGE_ELEMS + Lay::A_ELEMS + Lay::B_ELEMS; };

  // BM * BK / 8 16-byte chunks per operand tile (the transposed W tile: BK * BN / 8, the same count): CH per thread.
  auto load_async = [&](int s, int kt) {
    const int64_t k0 = int64_t(kt) * BK;
    T* As = stage_a(s);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int c = tid + i * kThreads, row = c / CPR, ch = (c % CPR) * 8;
      const int64_t gm = g.m0 + row, gk = k0 + ch;
      const bool ok = gm < g.a_rows && gk < g.red;
      cp_async16(As + row * LDA + ch, ok ? A + gm * g.sa + gk : A, ok);
    }
    if (g.do_b) {
      T* Bs = stage_b(s);
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        const int c = tid + i * kThreads;
        if constexpr (kBTrans) {  // [BK red rows][BN out cols]: 16 chunks per row
          const int row = c >> 4, ch = (c & 15) * 8;
          const int64_t gk = k0 + row, gn = g.n0 + ch;
          const bool ok = gk < g.red && gn < g.b_out;
          cp_async16(Bs + row * LDB + ch, ok ? B + gk * g.sb + gn : B, ok);
        } else {  // [BN out rows][BK red cols]: CPR chunks per row
          const int row = c / CPR, ch = (c % CPR) * 8;
          const int64_t gn = g.n0 + row, gk = k0 + ch;
          const bool ok = gn < g.b_out && gk < g.red;
          cp_async16(Bs + row * LDB + ch, ok ? B + gn * g.sb + gk : B, ok);
        }
      }
    }
  };
  float lreg[L_PER_T];
  auto load_l = [&](int kt) {
    const int64_t k0 = int64_t(kt) * BK;
#pragma unroll
    for (int i = 0; i < L_PER_T; ++i) {
      const int e = tid + i * kThreads;
      lreg[i] = e < l_count ? lora_val(e / BK, k0 + e % BK) : 0.0f;
    }
  };
  auto store_l = [&](int s) {
    T* Ls = stage_l(s);
#pragma unroll
    for (int i = 0; i < L_PER_T; ++i) {
      const int e = tid + i * kThreads;
      if (e < l_count) Ls[(e / BK) * LDA + e % BK] = from_f32<T>(lreg[i]);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) {
      load_async(s, s);
      load_l(s);
      store_l(s);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt visible to all warps; every warp is done with stage (kt-1) % S
    const int s = kt % STAGES, pf = kt + STAGES - 1;
    if (pf < KT) {
      load_async(pf % STAGES, pf);
      load_l(pf);
    }
    cp_async_commit();  // possibly empty: keeps the group count = tile count for wait_group

    const T* As = stage_a(s);
    const T* Bs = stage_b(s);
    const T* Ls = stage_l(s);
    const T* Xl = pre(As, kt);
    if (Xl == nullptr) Xl = As;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      if (g.do_b) {
        uint32_t af[4][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
          ldsm_x4(af[mi], As + (wm * 64 + mi * 16 + (lane & 15)) * LDA + ks + (lane >> 4) * 8);
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          uint32_t t[4];
          if constexpr (kBTrans)
            ldsm_x4_t(t, Bs + (ks + (lane & 7) + ((lane >> 3) & 1) * 8) * LDB + wn * 32 + nj * 16 + (lane >> 4) * 8);
          else
            ldsm_x4(t, Bs + (wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDB + ks + ((lane >> 3) & 1) * 8);
          bf[2 * nj][0] = t[0], bf[2 * nj][1] = t[1], bf[2 * nj + 1][0] = t[2], bf[2 * nj + 1][1] = t[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc.c[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
      }
      uint32_t xf[4];
      ldsm_x4(xf, Xl + (warp * 16 + (lane & 15)) * LDA + ks + (lane >> 4) * 8);
#pragma unroll
      for (int t = 0; t < RP_MAX / 16; ++t) {
        if (t * 16 < g.rp) {
          uint32_t lf[4];
          ldsm_x4(lf, Ls + (t * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDA + ks + ((lane >> 3) & 1) * 8);
          mma16816<T>(acc.l[2 * t], xf, lf[0], lf[1]);
          mma16816<T>(acc.l[2 * t + 1], xf, lf[2], lf[3]);
        }
      }
    }
    if (pf < KT) store_l(pf % STAGES);
    post(As, kt);
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: the caller's epilogue may alias it
}

// Writes the accumulators to fp32 shared memory: C [BM][ldc] and the LoRA product [BM][ldl] (first rp columns).
__device__ __forceinline__ void store_acc(const Acc& acc, float* C, int ldc, float* Lp, int ldl, int rp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3;
  const int r0 = lane >> 2, c0 = 2 * (lane & 3);
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      float* p = C + (wm * 64 + mi * 16 + r0) * ldc + wn * 32 + ni * 8 + c0;
      p[0] = acc.c[mi][ni][0], p[1] = acc.c[mi][ni][1];
      p[8 * ldc] = acc.c[mi][ni][2], p[8 * ldc + 1] = acc.c[mi][ni][3];
    }
#pragma unroll
  for (int t = 0; t < RP_MAX / 8; ++t) {
    if (t * 8 < rp) {
      float* p = Lp + (warp * 16 + r0) * ldl + t * 8 + c0;
      p[0] = acc.l[t][0], p[1] = acc.l[t][1];
      p[8 * ldl] = acc.l[t][2], p[8 * ldl + 1] = acc.l[t][3];
    }
  }
}

// Whether a row-major 16-bit operand can be fed by 16-byte cp.async: unit inner stride, row stride, row length and
// base address all multiples of 8 elements / 16 bytes (so every chunk is entirely inside or outside the matrix).
inline bool cp_async_ok(const void* p, int64_t row_stride, int64_t inner_stride, int64_t row_len) {
  return inner_stride == 1 && row_stride % 8 == 0 && row_len % 8 == 0 && (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

}  // namespace pipe
}  // namespace lora

// BK instance of the pipelined kernels (32 or 64, from lora::pipe_bk() or the launcher's fallback).
#define LORA_DISPATCH_BK(bk, BKV, ...) \
  if ((bk) == 64) {                    \
    constexpr int BKV = 64;            \
    __VA_ARGS__;                       \
  } else {                             \
    constexpr int BKV = 32;            \
    __VA_ARGS__;                       \
  }
