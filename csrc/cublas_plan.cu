// Plan "cublas": cuBLASLt for X·Wᵀ and G·W, these kernels for everything rank-r, one C++ call per direction.
//
// Forward (3 launches):
//   F1 rank_reduce   XA partials [ksplit][M][RP] = Σ_{k in split} (X ⊙ Z)[m, k] · A[j, k]       reads X once
//   F2 cuBLASLt      Y = X Wᵀ
//   F3 lowrank_add   Y += b + s · XA Bᵀ (one read and write of Y), xa = Σ partials (fp32, saved)
// Backward (up to 5 launches; each only when a gradient that needs it is wanted):
//   B1 rank_reduce   GB partials = Σ_{n in split} G[m, n] · B[n, j]                               reads G once
//   B2 cuBLASLt      dX = G W
//   B3 lowrank_add   dX += s · (GB A) ⊙ Z / (1-p), dA partials [msplit][r][K] = GBᵀ (X ⊙ Z)    reads X once
//   B4 g_pass        dB partials [msplit][N][r] = Gᵀ XA, db partials [msplit][N] = Σ G          reads G once
//   B5 reduce        dA, dB, db = (s ·) Σ_split partials, in split order, into the flat fp32 buffer
// Why the rank-r term is added after the GEMM and not seeded under it (beta = 1 onto s·XA Bᵀ): both cost two
// passes over Y, but seeding rounds the LoRA term (often the larger one: s·XA Bᵀ ~ 2 against X Wᵀ ~ 1 in the
// tests) to the activation dtype before the sum, where torch and the precision contract round the base GEMM; the
// CPU emulation measured the seeded fp16 forward at 2.02x torch's error (tests/test_cuda_cublas_emu.py, M=300).
// Adding after the GEMM keeps torch's rounding order: round(round(X Wᵀ) + b + s·XA Bᵀ).
// Every reduction is a fixed-order sum (split 0, 1, ...; rows in order inside a tile): no atomics, so the
// gradients are bit-reproducible for the same shapes (the splits depend on the sizes only: cublas_plan.h).
// Precision contract (lora_kernels/backends/torch/lora.py): every product takes its operands in the activation
// dtype (fp32 adapters, XA, GB and X ⊙ Z/(1-p) rounded to it as an MMA input), accumulates in fp32.
//
// Tiles: 64 rows x (64-column reduction steps | 128-column output tiles), 8 warps, 16x16x16 warp MMAs on shared
// memory (WMMA tensor cores for fp16/bf16, exact fp32 FMAs for fp32), global loads staged through registers one
// tile ahead so the next tile's loads overlap this tile's MMAs. RP = r rounded up to 16 <= 64.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cublas_plan.h"
#include "lora_common.cuh"
#include "lt_gemm.h"

namespace lora::plan {
namespace {

constexpr int BM = kRowBlock;    // 64 rows per tile
constexpr int BC = kColTile;     // 128 output columns per tile (lowrank_add, dB)
constexpr int BR = kReduceStep;  // 64 columns per step of the rank reduction
constexpr int PAD = 8;           // elements of row padding in every shared tile (16-bit WMMA: ld % 8 == 0)

// C[16x16] (fp32) += A[16x16] · B[16x16] for one warp; operands in shared memory in the activation dtype.
//   A element (i, kk) at a[kColA ? kk * lda + i : i * lda + kk]
//   B element (kk, j) at b[kColB ? j * ldb + kk : kk * ldb + j]
// store(): C row-major into fp32 shared memory. 16-bit: WMMA (ld % 8 == 0, 32-byte aligned pointers: every tile
// below has ld = width + 8 and 16-element offsets). fp32: exact FMAs, lane l owns row l/2, columns (l%2)*8..+8.
#ifndef LORA_EMULATE
template <typename T, bool kColA, bool kColB>
struct TileMma {
  using ALayout = std::conditional_t<kColA, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  using BLayout = std::conditional_t<kColB, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  __device__ __forceinline__ static void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }
  __device__ __forceinline__ static void mma(Acc& c, const T* a, int lda, const T* b, int ldb) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
    nvcuda::wmma::load_matrix_sync(fa, a, lda);
    nvcuda::wmma::load_matrix_sync(fb, b, ldb);
    nvcuda::wmma::mma_sync(c, fa, fb, c);
  }
  __device__ __forceinline__ static void store(float* c, int ldc, const Acc& acc) {
    nvcuda::wmma::store_matrix_sync(c, acc, ldc, nvcuda::wmma::mem_row_major);
  }
};

#endif

// fp32 (and, under LORA_EMULATE, every dtype): exact fp32 FMAs on the operands converted to fp32.
template <typename T, bool kColA, bool kColB>
struct TileMmaSimt {
  struct Acc {
    float v[8];
  };
  __device__ __forceinline__ static void zero(Acc& c) {
#pragma unroll
    for (int j = 0; j < 8; ++j) c.v[j] = 0.0f;
  }
  __device__ __forceinline__ static void mma(Acc& c, const T* a, int lda, const T* b, int ldb) {
    const int lane = threadIdx.x & 31, i = lane >> 1, j0 = (lane & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      const float av = to_f32(kColA ? a[kk * lda + i] : a[i * lda + kk]);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        c.v[j] = fmaf(av, to_f32(kColB ? b[(j0 + j) * ldb + kk] : b[kk * ldb + j0 + j]), c.v[j]);
    }
  }
  __device__ __forceinline__ static void store(float* c, int ldc, const Acc& acc) {
    const int lane = threadIdx.x & 31;
    float* row = c + (lane >> 1) * ldc + (lane & 1) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) row[j] = acc.v[j];
  }
};

#ifdef LORA_EMULATE
template <typename T, bool kColA, bool kColB>
struct TileMma : TileMmaSimt<T, kColA, kColB> {};
#else
template <bool kColA, bool kColB>
struct TileMma<float, kColA, kColB> : TileMmaSimt<float, kColA, kColB> {};
#endif

// Element (j, c) of a small adapter-like operand with run-time dtype and strides, 0 outside [r, cols).
__device__ __forceinline__ float load_small(const void* q, int dtype, int64_t sj, int64_t sc, int64_t j, int64_t c,
                                            int64_t r, int64_t cols) {
  return (j < r && c < cols) ? load_dyn(q, j * sj + c * sc, dtype) : 0.0f;
}

// ------------------------------------------------------------------------------------------------ rank reduce
// part[split][m][j] = Σ_{c in split} rows_d[m, c] · ad[j, c],  rows_d = rows ⊙ Z / (1-p) when drop.enabled.
// Grid (cdiv(R, 64), ksplit). Warp w: row fragment w % 4, reduction half w / 4 of each 64-column step; the two
// halves are added in the epilogue (fixed order).
struct RankReduceArgs {
  const void* rows;
  int64_t ld, R, C;
  const void* ad;
  int ad_dtype;
  int64_t ad_sj, ad_sc;
  int64_t r, rp, cols_per_split;
  DropoutParams drop;  // counter m * C + c
  float* part;
};

template <typename T>
size_t rank_reduce_smem(int64_t rp) {
  const size_t main_bytes = sizeof(T) * (BM + rp) * (BR + PAD);
  const size_t epi_bytes = sizeof(float) * 2 * BM * (rp + 4);
  return std::max(main_bytes, epi_bytes);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) rank_reduce_kernel(const RankReduceArgs p) {
  using Mma = TileMma<T, false, true>;
  constexpr int LD = BR + PAD, VN = Vec<T>::N, XV = BM * BR / (kThreads * VN);
  constexpr int AV = 64 * BR / kThreads;  // adapter elements per thread at RP = 64
  LORA_DYNAMIC_SMEM(smem);
  T* Xs = reinterpret_cast<T*>(smem);
  T* As = Xs + BM * LD;
  const T* x = static_cast<const T*>(p.rows);
  const int tid = threadIdx.x, warp = tid >> 5, rf = warp & 3, kh = warp >> 2;
  const int rp = static_cast<int>(p.rp), nrf = rp / 16, na = rp * BR / kThreads;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int64_t c_begin = int64_t(blockIdx.y) * p.cols_per_split;
  const int64_t c_end = std::min(p.C, c_begin + p.cols_per_split);
  const bool vec_ok = rows_vectorizable(x, p.ld, 1);

  Vec<T> xr[XV];
  float ar[AV];
  auto load = [&](int64_t c0) {
#pragma unroll
    for (int v = 0; v < XV; ++v) {
      const int idx = (tid + v * kThreads) * VN;
      load_vec(xr[v], x, m0 + idx / BR, c0 + idx % BR, p.R, c_end, p.ld, 1, vec_ok);
    }
#pragma unroll
    for (int e = 0; e < AV; ++e) {
      if (e >= na) break;
      const int idx = tid + e * kThreads;
      const int j = p.ad_sc == 1 ? idx / BR : idx % rp, cc = p.ad_sc == 1 ? idx % BR : idx / rp;
      ar[e] = load_small(p.ad, p.ad_dtype, p.ad_sj, p.ad_sc, j, c0 + cc, p.r, c_end);
    }
  };
  auto stage = [&](int64_t c0) {
#pragma unroll
    for (int v = 0; v < XV; ++v) {
      const int idx = (tid + v * kThreads) * VN, i = idx / BR, cc = idx % BR;
#pragma unroll
      for (int t = 0; t < VN; ++t) {
        float xv = to_f32(xr[v].v[t]);
        if (p.drop.enabled) xv = dropout_keep(p.drop, m0 + i, c0 + cc + t, p.C) ? xv * p.drop.inv_keep : 0.0f;
        Xs[i * LD + cc + t] = from_f32<T>(xv);
      }
    }
#pragma unroll
    for (int e = 0; e < AV; ++e) {
      if (e >= na) break;
      const int idx = tid + e * kThreads;
      const int j = p.ad_sc == 1 ? idx / BR : idx % rp, cc = p.ad_sc == 1 ? idx % BR : idx / rp;
      As[j * LD + cc] = from_f32<T>(ar[e]);
    }
  };

  typename Mma::Acc acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) Mma::zero(acc[f]);
  if (c_begin < c_end) load(c_begin);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += BR) {
    stage(c0);
    __syncthreads();
    if (c0 + BR < c_end) load(c0 + BR);  // in flight during the MMAs
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const int kk = (kh * 2 + ks) * 16;
#pragma unroll
      for (int f = 0; f < 4; ++f)
        if (f < nrf) Mma::mma(acc[f], Xs + rf * 16 * LD + kk, LD, As + f * 16 * LD + kk, LD);
    }
    __syncthreads();
  }
  const int ldc = rp + 4;
  float* Cs = reinterpret_cast<float*>(smem);  // aliases the tiles: the loop ended with a barrier
#pragma unroll
  for (int f = 0; f < 4; ++f)
    if (f < nrf) Mma::store(Cs + (kh * BM + rf * 16) * ldc + f * 16, ldc, acc[f]);
  __syncthreads();
  float* out = p.part + int64_t(blockIdx.y) * p.R * rp;
  for (int e = tid; e < BM * rp; e += kThreads) {
    const int i = e / rp, j = e % rp;
    if (m0 + i < p.R) out[(m0 + i) * rp + j] = Cs[i * ldc + j] + Cs[(BM + i) * ldc + j];
  }
}

// ------------------------------------------------------------------------------------------- lowrank_add (+ dA)
// For the column tile [n0, n0 + 128) and the rows of split blockIdx.y, 64 rows at a time:
//   P      = Σ_s part[s]                               (fp32; p_out = P by column tile 0: the forward's xa)
//   out    = out + b + s · (P_r Q_r) [⊙ Z / (1-p)]     (out holds the cuBLASLt GEMM: Y = X Wᵀ or dX = G W)
//   da    += P_rᵀ (x ⊙ Z / (1-p))_r                     (dA partial of this split, stored at the end)
// Q element (j, c) at q[j * q_sj + c * q_sc] (Bᵀ in the forward, A in the backward), staged once per CTA.
struct AddArgs {
  const float* part;
  int64_t ksplit;
  float* p_out;
  const void* q;
  int q_dtype;
  int64_t q_sj, q_sc;
  void* out;
  int64_t ld_out;
  const void* bias;
  bool add_mask;  // multiply the rank-r term by Z / (1-p) (backward dX)
  const void* x;
  int64_t ldx;
  float* da_part;
  int64_t M, cols, r, rp, rows_per_split;
  float scale;
  DropoutParams drop;  // counter m * cols + c
};

struct AddSmem {
  size_t qs, ps, xs, ks, cs, total;
};

template <typename T>
AddSmem add_smem(int64_t rp, bool do_da) {
  AddSmem s{};
  s.qs = 0;
  s.ps = s.qs + align128(sizeof(T) * rp * (BC + PAD));
  s.xs = s.ps + align128(sizeof(T) * BM * (rp + PAD));
  s.ks = s.xs + (do_da ? align128(sizeof(T) * BM * (BC + PAD)) : 0);
  s.cs = s.ks + (do_da ? align128(BM * BC) : 0);
  s.total = s.cs + align128(sizeof(float) * BM * (BC + 4));
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) lowrank_add_kernel(const AddArgs p, const AddSmem L) {
  using AddMma = TileMma<T, false, false>;  // P [rows][j] x Q [j][c]
  using DaMma = TileMma<T, true, false>;    // Pᵀ (P read column-major) x X [rows][c]
  constexpr int LDQ = BC + PAD, LDCS = BC + 4, VN = Vec<T>::N, XV = BM * BC / (kThreads * VN);
  LORA_DYNAMIC_SMEM(smem);
  T* Qs = reinterpret_cast<T*>(smem + L.qs);
  T* Ps = reinterpret_cast<T*>(smem + L.ps);
  T* Xs = reinterpret_cast<T*>(smem + L.xs);
  uint8_t* Ks = smem + L.ks;
  float* Cs = reinterpret_cast<float*>(smem + L.cs);
  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  const int rp = static_cast<int>(p.rp), nrf = rp / 16, ldp = rp + PAD;
  const int64_t n0 = int64_t(blockIdx.x) * BC, M = p.M, cols = p.cols;
  const int64_t row_begin = int64_t(blockIdx.y) * p.rows_per_split;
  const int64_t row_end = std::min(M, row_begin + p.rows_per_split);
  const bool do_add = p.out != nullptr, do_da = p.da_part != nullptr, masked = p.drop.enabled;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const bool x_vec = do_da && rows_vectorizable(x, p.ldx, 1);
  const bool out_vec = do_add && p.ld_out % VN == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0;

  for (int e = tid; e < rp * BC; e += kThreads) {
    const int j = p.q_sc == 1 ? e / BC : e % rp, c = p.q_sc == 1 ? e % BC : e / rp;
    Qs[j * LDQ + c] = from_f32<T>(load_small(p.q, p.q_dtype, p.q_sj, p.q_sc, j, n0 + c, p.r, cols));
  }

  typename DaMma::Acc dacc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) DaMma::zero(dacc[f]);
  Vec<T> xr[XV];
  auto load_x = [&](int64_t m0) {
#pragma unroll
    for (int v = 0; v < XV; ++v) {
      const int idx = (tid + v * kThreads) * VN;
      load_vec(xr[v], x, m0 + idx / BC, n0 + idx % BC, M, cols, p.ldx, 1, x_vec);
    }
  };
  if (do_da && row_begin < row_end) load_x(row_begin);

  for (int64_t m0 = row_begin; m0 < row_end; m0 += BM) {
    for (int e = tid; e < BM * rp; e += kThreads) {
      const int i = e / rp, j = e % rp;
      const int64_t m = m0 + i;
      float v = 0.0f;
      if (m < M)
        for (int64_t s = 0; s < p.ksplit; ++s) v += p.part[(s * M + m) * rp + j];
      Ps[i * ldp + j] = from_f32<T>(v);
      if (p.p_out != nullptr && blockIdx.x == 0 && m < M && j < p.r) p.p_out[m * p.r + j] = v;
    }
    if (do_da) {
#pragma unroll
      for (int v = 0; v < XV; ++v) {
        const int idx = (tid + v * kThreads) * VN, i = idx / BC, c = idx % BC;
#pragma unroll
        for (int t = 0; t < VN; ++t) {
          float xv = to_f32(xr[v].v[t]);
          if (masked) {
            const bool keep = dropout_keep(p.drop, m0 + i, n0 + c + t, cols);
            Ks[i * BC + c + t] = keep;
            xv = keep ? xv * p.drop.inv_keep : 0.0f;
          }
          Xs[i * LDQ + c + t] = from_f32<T>(xv);
        }
      }
    }
    __syncthreads();
    if (do_da && m0 + BM < row_end) load_x(m0 + BM);  // in flight during the MMAs and the stores
    if (do_add) {
      typename AddMma::Acc sacc[2][2];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) AddMma::zero(sacc[a][b]);
      for (int kk = 0; kk < rp; kk += 16)
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 2; ++b)
            AddMma::mma(sacc[a][b], Ps + (wm * 32 + a * 16) * ldp + kk, ldp, Qs + kk * LDQ + wn * 32 + b * 16, LDQ);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) AddMma::store(Cs + (wm * 32 + a * 16) * LDCS + wn * 32 + b * 16, LDCS, sacc[a][b]);
    }
    if (do_da) {
#pragma unroll
      for (int kk = 0; kk < BM; kk += 16)
#pragma unroll
        for (int f = 0; f < 4; ++f)
          if (f < nrf) DaMma::mma(dacc[f], Ps + kk * ldp + f * 16, ldp, Xs + kk * LDQ + warp * 16, LDQ);
    }
    __syncthreads();
    if (do_add) {
      for (int e = tid * VN; e < BM * BC; e += kThreads * VN) {
        const int i = e / BC, c = e % BC;
        const int64_t m = m0 + i, n = n0 + c;
        if (m >= M || n >= cols) continue;
        T* row = out + m * p.ld_out;
        const bool vec = out_vec && n + VN <= cols;
        Vec<T> o;
        if (vec) {
          *reinterpret_cast<uint4*>(o.v) = *reinterpret_cast<const uint4*>(row + n);
        } else {
#pragma unroll
          for (int t = 0; t < VN; ++t) o.v[t] = n + t < cols ? row[n + t] : from_f32<T>(0.0f);
        }
#pragma unroll
        for (int t = 0; t < VN; ++t) {
          float v = p.scale * Cs[i * LDCS + c + t];
          if (p.add_mask && masked) {
            const bool keep = do_da ? Ks[i * BC + c + t] != 0 : dropout_keep(p.drop, m, n + t, cols);
            v = keep ? v * p.drop.inv_keep : 0.0f;
          }
          float base = to_f32(o.v[t]);
          if (bias != nullptr && n + t < cols) base += to_f32(bias[n + t]);
          o.v[t] = from_f32<T>(base + v);
        }
        if (vec) {
          *reinterpret_cast<uint4*>(row + n) = *reinterpret_cast<const uint4*>(o.v);
        } else {
          for (int t = 0; t < VN && n + t < cols; ++t) row[n + t] = o.v[t];
        }
      }
      __syncthreads();  // Cs is rewritten by the next row block
    }
  }
  if (do_da) {
#pragma unroll
    for (int f = 0; f < 4; ++f)
      if (f < nrf) DaMma::store(Cs + f * 16 * LDCS + warp * 16, LDCS, dacc[f]);
    __syncthreads();
    float* da = p.da_part + int64_t(blockIdx.y) * p.r * cols;
    for (int e = tid; e < p.r * BC; e += kThreads) {
      const int j = e / BC, c = e % BC;
      if (n0 + c < cols) da[j * cols + n0 + c] = Cs[j * LDCS + c];
    }
  }
}

// ------------------------------------------------------------------------------------------------ dB, db
// For the column tile [n0, n0 + 128) of G and the rows of split blockIdx.y:
//   db_part[split][n][j] = Σ_rows G[m, n] · XA_r[m, j]      dbias_part[split][n] = Σ_rows G[m, n]
// Warp w owns the 16 columns 16w..: all RP/16 rank fragments.
struct GPassArgs {
  const void* g;
  int64_t ldg;
  const float* xa;
  float* db_part;     // or nullptr
  float* dbias_part;  // or nullptr
  int64_t M, N, r, rp, rows_per_split;
};

template <typename T>
size_t gpass_smem(int64_t rp) {
  return align128(sizeof(T) * BM * (BC + PAD)) + align128(sizeof(T) * BM * (rp + PAD)) +
         align128(sizeof(float) * BC * (rp + 4));
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) gpass_kernel(const GPassArgs p) {
  using Mma = TileMma<T, true, false>;  // Gᵀ (G read column-major) x XA [rows][j]
  constexpr int LDG = BC + PAD, VN = Vec<T>::N, XV = BM * BC / (kThreads * VN);
  LORA_DYNAMIC_SMEM(smem);
  const int rp = static_cast<int>(p.rp), nrf = rp / 16, ldx = rp + PAD, ldc = rp + 4;
  T* Gs = reinterpret_cast<T*>(smem);
  T* XAs = reinterpret_cast<T*>(smem + align128(sizeof(T) * BM * LDG));
  float* Cs = reinterpret_cast<float*>(smem + align128(sizeof(T) * BM * LDG) + align128(sizeof(T) * BM * ldx));
  const T* g = static_cast<const T*>(p.g);
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t n0 = int64_t(blockIdx.x) * BC, M = p.M;
  const int64_t row_begin = int64_t(blockIdx.y) * p.rows_per_split;
  const int64_t row_end = std::min(M, row_begin + p.rows_per_split);
  const bool do_db = p.db_part != nullptr, do_bias = p.dbias_part != nullptr;
  const bool vec_ok = rows_vectorizable(g, p.ldg, 1);

  typename Mma::Acc acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) Mma::zero(acc[f]);
  float bacc = 0.0f;
  Vec<T> gr[XV];
  auto load_g = [&](int64_t m0) {
#pragma unroll
    for (int v = 0; v < XV; ++v) {
      const int idx = (tid + v * kThreads) * VN;
      load_vec(gr[v], g, m0 + idx / BC, n0 + idx % BC, M, p.N, p.ldg, 1, vec_ok);
    }
  };
  if (row_begin < row_end) load_g(row_begin);
  for (int64_t m0 = row_begin; m0 < row_end; m0 += BM) {
#pragma unroll
    for (int v = 0; v < XV; ++v) {
      const int idx = (tid + v * kThreads) * VN;
      store_vec_smem(Gs + (idx / BC) * LDG + idx % BC, gr[v]);
    }
    if (do_db) {
      for (int e = tid; e < BM * rp; e += kThreads) {
        const int i = e / rp, j = e % rp;
        const int64_t m = m0 + i;
        XAs[i * ldx + j] = from_f32<T>((m < M && j < p.r) ? p.xa[m * p.r + j] : 0.0f);
      }
    }
    __syncthreads();
    if (m0 + BM < row_end) load_g(m0 + BM);
    if (do_bias && tid < BC)
      for (int i = 0; i < BM; ++i) bacc += to_f32(Gs[i * LDG + tid]);
    if (do_db) {
#pragma unroll
      for (int kk = 0; kk < BM; kk += 16)
#pragma unroll
        for (int f = 0; f < 4; ++f)
          if (f < nrf) Mma::mma(acc[f], Gs + kk * LDG + warp * 16, LDG, XAs + kk * ldx + f * 16, ldx);
    }
    __syncthreads();
  }
  if (do_bias && tid < BC && n0 + tid < p.N) p.dbias_part[int64_t(blockIdx.y) * p.N + n0 + tid] = bacc;
  if (do_db) {
#pragma unroll
    for (int f = 0; f < 4; ++f)
      if (f < nrf) Mma::store(Cs + warp * 16 * ldc + f * 16, ldc, acc[f]);
    __syncthreads();
    float* db = p.db_part + int64_t(blockIdx.y) * p.N * p.r;
    for (int e = tid; e < BC * p.r; e += kThreads) {
      const int nn = static_cast<int>(e / p.r), j = static_cast<int>(e % p.r);
      if (n0 + nn < p.N) db[(n0 + nn) * p.r + j] = Cs[nn * ldc + j];
    }
  }
}

// ------------------------------------------------------------------------------------------------ reduce
struct ReduceSeg {
  const float* part;  // [splits][len]
  float* out;         // [len]
  int64_t len, splits;
  float scale;
};
struct ReduceArgs {
  ReduceSeg seg[3];
};

__global__ void __launch_bounds__(kThreads) reduce_kernel(const ReduceArgs a) {
  const ReduceSeg s = a.seg[blockIdx.y];
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < s.len; e += int64_t(gridDim.x) * kThreads) {
    float v = 0.0f;
    for (int64_t k = 0; k < s.splits; ++k) v += s.part[k * s.len + e];
    s.out[e] = v * s.scale;
  }
}

// ------------------------------------------------------------------------------------------------ host side
struct Carve {  // sequential 256-byte aligned slices of the caller's workspace
  char* base;
  int64_t used = 0;
  template <typename U>
  U* take(int64_t bytes) {
    U* p = reinterpret_cast<U*>(base == nullptr ? nullptr : base + used);
    used += (bytes + 255) / 256 * 256;
    return p;
  }
};

void launch_check(const char* call, const char* kernel) {
#ifdef LORA_EMULATE
  (void)call, (void)kernel;
#else
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(call) + ": launch of " + kernel + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
#endif
}

template <typename K>
void smem_opt_in(const char* call, K kernel, size_t bytes) {
  if (bytes > 48 * 1024) set_smem_limit(call, reinterpret_cast<const void*>(kernel), bytes);
}

template <typename T>
void rank_reduce(const char* call, const RankReduceArgs& a, const Split& s, cudaStream_t st) {
  const size_t smem = rank_reduce_smem<T>(a.rp);
  smem_opt_in(call, rank_reduce_kernel<T>, smem);
  const dim3 grid(static_cast<unsigned>(cdiv(a.R, BM)), static_cast<unsigned>(s.ksplit));
  LORA_LAUNCH(rank_reduce_kernel<T>, grid, kThreads, smem, st, a);
  launch_check(call, "rank_reduce_kernel");
}

template <typename T>
void lowrank_add(const char* call, const AddArgs& a, cudaStream_t st) {
  const AddSmem L = add_smem<T>(a.rp, a.da_part != nullptr);
  smem_opt_in(call, lowrank_add_kernel<T>, L.total);
  const dim3 grid(static_cast<unsigned>(cdiv(a.cols, BC)), static_cast<unsigned>(cdiv(a.M, a.rows_per_split)));
  LORA_LAUNCH(lowrank_add_kernel<T>, grid, kThreads, L.total, st, a, L);
  launch_check(call, "lowrank_add_kernel");
}

template <typename T>
void run_fwd_t(const char* call, const FwdArgs& p, cudaStream_t st) {
  const Split s = rank_reduce_split(p.M, p.K, p.r);
  Carve ws{static_cast<char*>(p.ws)};
  float* part = ws.take<float>(s.ksplit * p.M * s.rp * 4);
  void* lt_ws = ws.take<char>(kLtWorkspaceBytes);

  RankReduceArgs rr{p.x, p.ldx, p.M, p.K, p.a, p.adapter_dtype, p.K, 1, p.r, s.rp, s.cols_per_split, p.drop, part};
  rank_reduce<T>(call, rr, s, st);
  // Yᵀ [N x M] (column-major, ld N) = op(A) op(B) with op(A) = W [N x K] (W row-major is K x N column-major,
  // ld K: transposed) and op(B) = Xᵀ [K x M] (X row-major is K x M column-major, ld ldx)
  lt::matmul(call, lt::Gemm{p.act_dtype, true, false, p.N, p.M, p.K, p.K, p.ldx, p.N, p.w, p.x, p.y, 0.0f}, lt_ws,
             kLtWorkspaceBytes, st);
  AddArgs ad{};
  ad.part = part, ad.ksplit = s.ksplit, ad.p_out = p.xa;
  ad.q = p.b, ad.q_dtype = p.adapter_dtype, ad.q_sj = 1, ad.q_sc = p.r;  // Q(j, n) = B[n, j]
  ad.out = p.y, ad.ld_out = p.N, ad.bias = p.bias, ad.add_mask = false;
  ad.M = p.M, ad.cols = p.N, ad.r = p.r, ad.rp = s.rp, ad.rows_per_split = BM, ad.scale = p.scale, ad.drop = p.drop;
  lowrank_add<T>(call, ad, st);
}

template <typename T>
void run_bwd_t(const char* call, const BwdArgs& p, cudaStream_t st) {
  const Split s = bwd_split(p.M, p.N, p.K, p.r);
  const bool need_dx = p.dx != nullptr, need_da = p.off_da >= 0, need_db = p.off_db >= 0, need_bias = p.off_dbias >= 0;
  Carve ws{static_cast<char*>(p.ws)};
  float* gb_part = ws.take<float>(s.ksplit * p.M * s.rp * 4);
  float* da_part = ws.take<float>(s.msplit * p.r * p.K * 4);
  float* db_part = ws.take<float>(s.msplit * p.N * p.r * 4);
  float* dbias_part = ws.take<float>(s.msplit * p.N * 4);
  void* lt_ws = ws.take<char>(kLtWorkspaceBytes);

  if (need_dx || need_da) {
    RankReduceArgs rr{p.g,
                      p.ldg,
                      p.M,
                      p.N,
                      p.b,
                      p.adapter_dtype,
                      1,
                      p.r,
                      p.r,
                      s.rp,
                      s.cols_per_split,
                      make_dropout_params(false, 0, 0, 0, 1.0),
                      gb_part};  // Q(j, n) = B[n, j]
    rank_reduce<T>(call, rr, s, st);
    if (need_dx) {
      // dXᵀ [K x M] (ld K) = W (stored K x N, ld K) times Gᵀ (stored N x M, ld ldg)
      lt::matmul(call, lt::Gemm{p.act_dtype, false, false, p.K, p.M, p.N, p.K, p.ldg, p.K, p.w, p.g, p.dx, 0.0f}, lt_ws,
                 kLtWorkspaceBytes, st);
    }
    AddArgs ad{};
    ad.part = gb_part, ad.ksplit = s.ksplit, ad.p_out = nullptr;
    ad.q = p.a, ad.q_dtype = p.adapter_dtype, ad.q_sj = p.K, ad.q_sc = 1;  // Q(j, k) = A[j, k]
    ad.out = need_dx ? p.dx : nullptr, ad.ld_out = p.K, ad.bias = nullptr, ad.add_mask = true;
    ad.x = need_da ? p.x : nullptr, ad.ldx = p.ldx, ad.da_part = need_da ? da_part : nullptr;
    ad.M = p.M, ad.cols = p.K, ad.r = p.r, ad.rp = s.rp, ad.rows_per_split = s.rows_per_split;
    ad.scale = p.scale, ad.drop = p.drop;
    lowrank_add<T>(call, ad, st);
  }
  if (need_db || need_bias) {
    GPassArgs ga{
        p.g,  p.ldg,           p.xa, need_db ? db_part : nullptr, need_bias ? dbias_part : nullptr, p.M, p.N, p.r,
        s.rp, s.rows_per_split};
    const size_t smem = gpass_smem<T>(s.rp);
    smem_opt_in(call, gpass_kernel<T>, smem);
    const dim3 grid(static_cast<unsigned>(cdiv(p.N, BC)), static_cast<unsigned>(s.msplit));
    LORA_LAUNCH(gpass_kernel<T>, grid, kThreads, smem, st, ga);
    launch_check(call, "gpass_kernel");
  }
  if (need_da || need_db || need_bias) {
    ReduceArgs ra{};
    int nseg = 0;
    int64_t longest = 1;
    auto add = [&](bool need, const float* part, int64_t off, int64_t len, float scale) {
      if (!need) return;
      ra.seg[nseg++] = ReduceSeg{part, p.flat + off, len, s.msplit, scale};
      longest = std::max(longest, len);
    };
    add(need_da, da_part, p.off_da, p.r * p.K, p.scale);
    add(need_db, db_part, p.off_db, p.N * p.r, p.scale);
    add(need_bias, dbias_part, p.off_dbias, p.N, 1.0f);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(cdiv(longest, kThreads), 1024)), nseg);
    LORA_LAUNCH(reduce_kernel, grid, kThreads, 0, st, ra);
    launch_check(call, "reduce_kernel");
  }
}

}  // namespace

Split rank_reduce_split(int64_t rows, int64_t cols, int64_t r) {
  Split s{};
  s.rp = round_up(std::max<int64_t>(r, 1), 16);
  // about 256 CTAs, each reducing at least two 64-column steps
  const int64_t row_blocks = std::max<int64_t>(cdiv(rows, BM), 1);
  const int64_t max_split = std::max<int64_t>(cdiv(cols, 2 * BR), 1);
  const int64_t want = std::clamp<int64_t>(cdiv(256, row_blocks), 1, max_split);
  s.cols_per_split = round_up(cdiv(cols, want), BR);
  s.ksplit = cdiv(cols, s.cols_per_split);
  s.msplit = 1;
  s.rows_per_split = round_up(std::max<int64_t>(rows, 1), BM);
  return s;
}

Split bwd_split(int64_t M, int64_t N, int64_t K, int64_t r) {
  Split s = rank_reduce_split(M, N, r);
  // dA / dB / db: up to 8 row splits of at least 128 rows (2 row blocks), each a multiple of 64 rows
  const int64_t want = std::clamp<int64_t>(cdiv(M, 128), 1, kMaxSplits);
  s.rows_per_split = round_up(cdiv(std::max<int64_t>(M, 1), want), BM);
  s.msplit = cdiv(std::max<int64_t>(M, 1), s.rows_per_split);
  (void)K;
  return s;
}

int64_t fwd_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t r) {
  (void)N;
  const Split s = rank_reduce_split(M, K, r);
  Carve ws{nullptr};
  ws.take<float>(s.ksplit * M * s.rp * 4);
  ws.take<char>(kLtWorkspaceBytes);
  return ws.used;
}

int64_t bwd_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t r) {
  const Split s = bwd_split(M, N, K, r);
  Carve ws{nullptr};
  ws.take<float>(s.ksplit * M * s.rp * 4);
  ws.take<float>(s.msplit * r * K * 4);
  ws.take<float>(s.msplit * N * r * 4);
  ws.take<float>(s.msplit * N * 4);
  ws.take<char>(kLtWorkspaceBytes);
  return ws.used;
}

int fwd_launches(int64_t M) { return M == 0 ? 0 : 3; }

int bwd_launches(int64_t M, bool need_dx, bool need_da, bool need_db, bool need_dbias) {
  if (M == 0) return 0;
  return (need_dx || need_da ? 2 : 0) + (need_db || need_dbias ? 1 : 0) + (need_da || need_db || need_dbias ? 1 : 0) +
         (need_dx ? 1 : 0);
}

void run_fwd(const char* call, const FwdArgs& p, void* stream) {
  if (p.M == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  LORA_DISPATCH_ACT_DTYPE(p.act_dtype, T, run_fwd_t<T>(call, p, st));
}

void run_bwd(const char* call, const BwdArgs& p, void* stream) {
  if (p.M == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  LORA_DISPATCH_ACT_DTYPE(p.act_dtype, T, run_bwd_t<T>(call, p, st));
}

}  // namespace lora::plan
