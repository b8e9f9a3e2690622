// Fused LoRA backward. With G = dY [M, N] (DESIGN.md):
//
//   GB = G B            [M, r]     dX = G W + s · (GB A) ⊙ Z          dA = s · GBᵀ (X ⊙ Z)
//   dB = s · Gᵀ XA      [N, r]     db = Σ_rows G
//
// Kernel 1 (lora_bwd_kernel), grid (cdiv(M, BM), cdiv(K, BKX)); a block of 8 warps owns the [BM=64, BKX=128]
// tile of dX and streams G along all of N in chunks of BNR=32:
//
//   [column 0 only] XAs <- XA[m0:m0+64, :]   (fp32 buffer; values rounded to T: the dB GEMM's operand)
//   for n0 in 0..N step 32:
//       Gs  <- G[m0:m0+64, n0:n0+32]                              strided (stride_g_m, stride_g_n), predicated
//       WsT <- W[n0:n0+32, k0:k0+128]ᵀ                            (skipped when dX is not needed)
//       Bts <- B[n0:n0+32, 0:RP]ᵀ                                 RP = r rounded up to 16
//       acc   += Gs · WsT         warp (wm, wn) of the 2x4 warp grid: rows 32*wm.., cols 32*wn.. (2x2 frags)
//       accGB += Gs · Bts         [64, RP] fragments dealt round-robin to the 8 warps; GB is complete after the loop
//       [column 0 only] dB[n0:n0+32, :] += s · Gsᵀ XAs ; db[n0:n0+32] += Σ Gs   (fp32 SIMT, then atomics / partials)
//   epilogue (fp32, SIMT):
//       Cs <- acc, GBs <- accGB
//       dX = Cs + s · (GBs A[:, k0:k0+128]) ⊙ Z / (1-p)           A streamed in chunks of 32 ranks; cast at store
//       Xd <- X ⊙ Z / (1-p) tile (the mask regenerated from (seed, offset, m*K + k), never loaded)
//       dA[:, k0:k0+128] += s · GBsᵀ Xd
//
// Reductions over the M-tiles (dA, dB, db) go one of two ways:
//   * atomic mode (default): fp32 atomicAdd into a zeroed workspace. A per-column counter finds the last block
//     of each dA column tile / dB row chunk, which casts that slice to the output dtype: one launch in all.
//   * deterministic mode: every M-tile writes its own partial slice (no atomics); kernel 2 (lora_bwd_reduce)
//     sums the partials in a fixed order and casts: two launches, bit-reproducible.
#include <algorithm>

#include "lora_common.cuh"
#include "lora_pipe.cuh"

namespace lora {
namespace {

constexpr int BM = 64, BKX = 128, BNR = 32;
constexpr int LDT = BNR + 8;  // 16-bit WMMA ld % 8 == 0
constexpr int LDC = BKX + 4;  // fp32 staging, ld % 4 == 0
constexpr int JC = 32;        // rank chunk of A staged in the epilogue

struct BwdSmem {
  size_t gs, wst, bts, main_end;  // main loop, T
  size_t cs, ac, epi_end;         // epilogue fp32 (aliases the main region); Cs later holds the Xd tile
  size_t xas, total;              // XA (loop, column 0) then GB (epilogue), fp32 [BM, RP + 4]
};

template <typename T>
BwdSmem bwd_smem_layout(int rp) {
  BwdSmem s;
  s.gs = 0;
  s.wst = s.gs + align128(sizeof(T) * BM * LDT);
  s.bts = s.wst + align128(sizeof(T) * BKX * LDT);
  s.main_end = s.bts + align128(sizeof(T) * rp * LDT);
  s.cs = 0;
  s.ac = s.cs + align128(sizeof(float) * BM * LDC);
  s.epi_end = s.ac + align128(sizeof(float) * JC * BKX);
  s.xas = std::max(s.main_end, s.epi_end);
  s.total = s.xas + align128(sizeof(float) * BM * (rp + 4));  // + 16 bytes for the last-block flag at launch
  return s;
}

// Workspace layout (fp32 elements), shared by the kernel, the launcher and bwd_workspace_bytes.
struct BwdWs {
  int64_t tiles_m, da, dbm, dbias, cnt_k, cnt_n, total_floats;
};

// bm: rows per M tile of the kernel that runs (64 simple, 128 pipelined); the size callers allocate uses BM = 64,
// the larger of the two (deterministic partials are per M tile).
BwdWs bwd_ws_layout(int64_t M, int64_t N, int64_t K, int64_t r, bool det, int64_t bm = BM) {
  BwdWs w;
  w.tiles_m = cdiv(M, bm);
  const int64_t copies = det ? w.tiles_m : 1;  // deterministic: one partial slice per M-tile
  w.da = 0;
  w.dbm = w.da + copies * r * K;
  w.dbias = w.dbm + copies * N * r;
  w.cnt_k = w.dbias + copies * N;  // atomic mode only: uint32 counters
  w.cnt_n = w.cnt_k + (det ? 0 : cdiv(K, BKX));
  w.total_floats = w.cnt_n + (det ? 0 : cdiv(N, BNR));
  return w;
}

// Block-wide "am I the last of `expected` arrivals at *counter?" after this block's atomics (threadfence reduction).
__device__ __forceinline__ bool arrive_last(unsigned int* counter, unsigned int expected, bool* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(counter, 1u) == expected - 1;
  __syncthreads();
  if (*flag) __threadfence();
  return *flag;
}

// First column of CTAs, per staged G chunk [kBM rows][ldg] (columns n0..n0+BNR): dB[n0+nn, j] += s · Σ_m G XA and
// db[n0+nn] += Σ_m G over this CTA's rows (atomics, or this M tile's partial slice when deterministic); the last
// M tile to arrive casts the chunk's dB / db rows. Called by all threads of the CTA (arrive_last holds barriers).
template <typename T, int kBM>
__device__ __forceinline__ void bwd_db_chunk(const BwdParams& p, const BwdWs& W, const T* Gs, const int ldg,
                                             const float* XAs, const int ldx, const int64_t mt, const int64_t n0,
                                             const unsigned int tiles_m, bool* last_flag_ptr) {
  constexpr int BM = kBM;
  bool& last_flag = *last_flag_ptr;
  float* ws = static_cast<float*>(p.ws);
  const int64_t N = p.N, r = p.r;
  const int tid = threadIdx.x;
  const bool det = p.deterministic;
  const int adt = p.adapter_dtype;
  // dB[n0+nn, j] (+)= s · Σ_m G[m, n0+nn] XA[m, j] over this block's rows; lanes of a warp share j.
  for (int64_t e = tid; e < BNR * r; e += kThreads) {
    const int nn = static_cast<int>(e % BNR), j = static_cast<int>(e / BNR);
    float s = 0.0f;
#pragma unroll 8
    for (int i = 0; i < BM; ++i) s = fmaf(to_f32(Gs[i * ldg + nn]), XAs[i * ldx + j], s);
    const int64_t n = n0 + nn;
    if (n < N) {
      if (det)
        ws[W.dbm + (mt * N + n) * r + j] = p.scale * s;
      else
        atomicAdd(ws + W.dbm + n * r + j, p.scale * s);
    }
  }
  if (p.dbias != nullptr && tid < BNR) {
    float s = 0.0f;
    for (int i = 0; i < BM; ++i) s += to_f32(Gs[i * ldg + tid]);
    const int64_t n = n0 + tid;
    if (n < N) {
      if (det)
        ws[W.dbias + mt * N + n] = s;
      else
        atomicAdd(ws + W.dbias + n, s);
    }
  }
  if (!det) {
    // The last M-tile to finish this chunk casts dB (and db) rows n0..n0+32 to their dtypes.
    unsigned int* cnt = reinterpret_cast<unsigned int*>(ws + W.cnt_n) + n0 / BNR;
    if (arrive_last(cnt, tiles_m, &last_flag)) {
      const int64_t nend = n0 + BNR < N ? n0 + BNR : N;
      for (int64_t e = n0 * r + tid; e < nend * r; e += kThreads) store_dyn(p.db, e, __ldcg(ws + W.dbm + e), adt);
      if (p.dbias != nullptr)
        for (int64_t n = n0 + tid; n < nend; n += kThreads)
          store_dyn(p.dbias, n, __ldcg(ws + W.dbias + n), p.act_dtype);
    }
  }
}

// Epilogue shared by both main loops. In: Cs = G·W tile [kBM][LDC] and GBs = GB rows [kBM][ldx], fp32 in shared
// memory; Ac scratch for the A chunks. Writes dX = Cs + s · (GB A) ⊙ Z / (1-p), then dA (+)= s · GBᵀ (X ⊙ Z);
// the last M tile of column kcol casts its dA slice (atomic mode).
template <typename T, int kBM>
__device__ __forceinline__ void bwd_epilogue(const BwdParams& p, const BwdWs& W, float* Cs, float* Ac, const float* GBs,
                                             const int ldx, const int64_t mt, const int64_t k0, const unsigned int kcol,
                                             const unsigned int tiles_m, bool* last_flag_ptr) {
  constexpr int BM = kBM;
  constexpr int V = Vec<T>::N;
  bool& last_flag = *last_flag_ptr;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  float* ws = static_cast<float*>(p.ws);
  const int64_t M = p.M, K = p.K, r = p.r, m0 = mt * BM;
  const int tid = threadIdx.x;
  const bool do_dx = p.dx != nullptr, det = p.deterministic;
  const int adt = p.adapter_dtype;
  const bool x_vec = rows_vectorizable(x, p.stride_x_m, p.stride_x_k);
  const int tk = tid & (BKX - 1), tm = tid >> 7;  // thread owns column tk, rows tm + 2*i
  if (do_dx) {
    float lacc[BM / 2];
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) lacc[i] = 0.0f;
    for (int64_t j0 = 0; j0 < r; j0 += JC) {
      __syncthreads();
      for (int e = tid; e < JC * BKX; e += kThreads) {
        const int jj = e / BKX, kk = e % BKX;
        const int64_t j = j0 + jj, k = k0 + kk;
        Ac[jj * BKX + kk] = (j < r && k < K) ? load_dyn(p.a, j * K + k, adt) : 0.0f;
      }
      __syncthreads();
      const int jn = static_cast<int>(r - j0 < JC ? r - j0 : JC);
      for (int jj = 0; jj < jn; ++jj) {
        const float av = Ac[jj * BKX + tk];
#pragma unroll
        for (int i = 0; i < BM / 2; ++i) lacc[i] = fmaf(GBs[(tm + 2 * i) * ldx + j0 + jj], av, lacc[i]);
      }
    }
    const int64_t k = k0 + tk;
    if (k < K) {
      T* dx = static_cast<T*>(p.dx);
#pragma unroll
      for (int i = 0; i < BM / 2; ++i) {
        const int64_t m = m0 + tm + 2 * i;
        if (m < M) {
          float v = p.scale * lacc[i];
          if (p.drop.enabled) v = dropout_keep(p.drop, m, k, K) ? v * p.drop.inv_keep : 0.0f;
          dx[m * K + k] = from_f32<T>(Cs[(tm + 2 * i) * LDC + tk] + v);
        }
      }
    }
  }
  __syncthreads();  // Cs is free: it now holds Xd = X ⊙ Z / (1-p), rounded to T as the forward's MMA operand was

  float* Xd = Cs;
  for (int e = tid; e < BM * (BKX / V); e += kThreads) {
    const int i = e / (BKX / V), kk = (e % (BKX / V)) * V;
    const int64_t m = m0 + i, k = k0 + kk;
    Vec<T> xv;
    load_vec(xv, x, m, k, M, K, p.stride_x_m, p.stride_x_k, x_vec);
#pragma unroll
    for (int t = 0; t < V; ++t) {
      float v = to_f32(xv.v[t]);
      if (p.drop.enabled)
        v = (m < M && k + t < K && dropout_keep(p.drop, m, k + t, K)) ? operand_round<T>(v * p.drop.inv_keep) : 0.0f;
      Xd[i * LDC + kk + t] = v;
    }
  }
  __syncthreads();
  // dA[j, k0+kk] (+)= s · Σ_m GB[m, j] Xd[m, kk]; lanes of a warp share j, read consecutive kk.
  for (int64_t e = tid; e < r * BKX; e += kThreads) {
    const int kk = static_cast<int>(e % BKX), j = static_cast<int>(e / BKX);
    float s = 0.0f;
#pragma unroll 8
    for (int i = 0; i < BM; ++i) s = fmaf(GBs[i * ldx + j], Xd[i * LDC + kk], s);
    const int64_t k = k0 + kk;
    if (k < K) {
      if (det)
        ws[W.da + (mt * r + j) * K + k] = p.scale * s;
      else
        atomicAdd(ws + W.da + j * K + k, p.scale * s);
    }
  }
  if (!det) {
    unsigned int* cnt = reinterpret_cast<unsigned int*>(ws + W.cnt_k) + kcol;
    if (arrive_last(cnt, tiles_m, &last_flag)) {
      const int64_t kend = k0 + BKX < K ? k0 + BKX : K;
      for (int64_t e = tid; e < r * BKX; e += kThreads) {
        const int64_t j = e / BKX, k = k0 + e % BKX;
        if (k < kend) store_dyn(p.da, j * K + k, __ldcg(ws + W.da + j * K + k), adt);
      }
    }
  }
}

template <typename T, int kMaxGbFrags>
__global__ void __launch_bounds__(kThreads, kMaxGbFrags <= 2 ? 2 : 1)
    lora_bwd_kernel(const BwdParams p, const BwdSmem L, const BwdWs W, const int rp) {
  using Mma = WarpMma<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  // no static __shared__ in this kernel: the dynamic region then starts at offset 0 (WMMA needs 32-byte alignment)
  bool& last_flag = *reinterpret_cast<bool*>(smem + L.total);
  T* Gs = reinterpret_cast<T*>(smem + L.gs);
  T* WsT = reinterpret_cast<T*>(smem + L.wst);
  T* Bts = reinterpret_cast<T*>(smem + L.bts);
  float* XAs = reinterpret_cast<float*>(smem + L.xas);  // GBs after the loop
  const int ldx = rp + 4;

  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const int64_t M = p.M, N = p.N, K = p.K, r = p.r;
  const int64_t mt = blockIdx.x, m0 = mt * BM, k0 = int64_t(blockIdx.y) * BKX;
  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  const int n_gb_frags = 4 * (rp / 16);
  const bool do_dx = p.dx != nullptr, col0 = blockIdx.y == 0;
  const int adt = p.adapter_dtype;

  typename Mma::Acc acc[2][2], acc_gb[kMaxGbFrags];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) Mma::zero(acc[i][j]);
#pragma unroll
  for (int f = 0; f < kMaxGbFrags; ++f) Mma::zero(acc_gb[f]);

  if (col0) {
    for (int e = tid; e < BM * rp; e += kThreads) {
      const int i = e / rp, j = e % rp;
      XAs[i * ldx + j] = (m0 + i < M && j < r) ? operand_round<T>(p.xa[(m0 + i) * r + j]) : 0.0f;
    }
  }

  // 16-byte loads where the layout allows (contiguous rows, row lengths a multiple of 8 fp16 / 4 fp32 elements)
  constexpr int V = Vec<T>::N;
  const bool g_vec = rows_vectorizable(g, p.stride_g_m, p.stride_g_n);
  const bool w_vec = rows_vectorizable(w, K, int64_t(1));

  for (int64_t n0 = 0; n0 < N; n0 += BNR) {
    for (int e = tid; e < BM * (BNR / V); e += kThreads) {
      const int i = e / (BNR / V), nn = (e % (BNR / V)) * V;
      Vec<T> v;
      load_vec(v, g, m0 + i, n0 + nn, M, N, p.stride_g_m, p.stride_g_n, g_vec);
      store_vec_smem(Gs + i * LDT + nn, v);
    }
    if (do_dx) {
      for (int e = tid; e < BNR * (BKX / V); e += kThreads) {
        const int nn = e / (BKX / V), kk = (e % (BKX / V)) * V;
        Vec<T> v;
        load_vec(v, w, n0 + nn, k0 + kk, N, K, K, int64_t(1), w_vec);
#pragma unroll
        for (int t = 0; t < V; ++t) WsT[(kk + t) * LDT + nn] = v.v[t];
      }
    }
    for (int e = tid; e < BNR * rp; e += kThreads) {
      const int nn = e / rp, j = e % rp;
      const int64_t n = n0 + nn;
      Bts[j * LDT + nn] = from_f32<T>((n < N && j < r) ? load_dyn(p.b, n * r + j, adt) : 0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BNR; kk += 16) {
      if (do_dx) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j)
            Mma::mma(acc[i][j], Gs + (wm * 32 + i * 16) * LDT + kk, LDT, WsT + (wn * 32 + j * 16) * LDT + kk, LDT);
      }
#pragma unroll
      for (int f = 0; f < kMaxGbFrags; ++f) {
        const int fi = warp + 8 * f;
        if (fi < n_gb_frags)
          Mma::mma(acc_gb[f], Gs + (fi & 3) * 16 * LDT + kk, LDT, Bts + (fi >> 2) * 16 * LDT + kk, LDT);
      }
    }
    if (col0) bwd_db_chunk<T, BM>(p, W, Gs, LDT, XAs, ldx, mt, n0, gridDim.x, &last_flag);
    __syncthreads();
  }

  // ---- epilogue
  float* Cs = reinterpret_cast<float*>(smem + L.cs);
  float* Ac = reinterpret_cast<float*>(smem + L.ac);
  float* GBs = XAs;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) Mma::store(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, LDC, acc[i][j]);
#pragma unroll
  for (int f = 0; f < kMaxGbFrags; ++f) {
    const int fi = warp + 8 * f;
    if (fi < n_gb_frags) Mma::store(GBs + (fi & 3) * 16 * ldx + (fi >> 2) * 16, ldx, acc_gb[f]);
  }
  __syncthreads();

  bwd_epilogue<T, BM>(p, W, Cs, Ac, GBs, ldx, mt, k0, blockIdx.y, gridDim.x, &last_flag);
}

// Deterministic mode, launch 2: out[i] = Σ_t part[t][i] in t order, for dA, dB and db laid out back to back.
__global__ void __launch_bounds__(kThreads) lora_bwd_reduce(const BwdParams p, const BwdWs W) {
  const float* ws = static_cast<const float*>(p.ws);
  const int64_t nA = p.r * p.K, nB = p.N * p.r, nb = p.dbias ? p.N : 0;
  const int64_t T = W.tiles_m;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < nA + nB + nb;
       idx += int64_t(gridDim.x) * kThreads) {
    const float* base;
    int64_t len, i;
    void* out;
    int code;
    if (idx < nA) {
      base = ws + W.da, len = nA, i = idx, out = p.da, code = p.adapter_dtype;
    } else if (idx < nA + nB) {
      base = ws + W.dbm, len = nB, i = idx - nA, out = p.db, code = p.adapter_dtype;
    } else {
      base = ws + W.dbias, len = p.N, i = idx - nA - nB, out = p.dbias, code = p.act_dtype;
    }
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) s += base[t * len + i];
    store_dyn(out, i, s, code);
  }
}

// ---- pipelined kernel (fp16/bf16, r <= 64, 16-byte aligned rows): lora_pipe.cuh's main loop on a [128, 128] tile
// of dX (A operand G [M, N], B operand W read transposed, LoRA operand Bᵀ), 1-D grid in grouped order. Shared
// memory: the cp.async ring (main loop) aliased by the fp32 epilogue (Cs, Ac), then XA / GB and the flag.
struct BwdPipeSmem {
  size_t ring, main_end, cs, ac, epi_end, xas, total;
};

template <typename T, int kBK>
BwdPipeSmem bwd_pipe_layout() {
  using Lay = pipe::Layout<true, kBK>;
  BwdPipeSmem s;
  s.ring = 0;
  s.main_end = align128(sizeof(T) * pipe::Cfg<kBK>::STAGES * Lay::STAGE_ELEMS);
  s.cs = 0;
  s.ac = s.cs + align128(sizeof(float) * pipe::BM * LDC);
  s.epi_end = s.ac + align128(sizeof(float) * JC * BKX);
  s.xas = std::max(s.main_end, s.epi_end);
  s.total = s.xas + align128(sizeof(float) * pipe::BM * (pipe::RP_MAX + 4));  // + 16 bytes for the flag at launch
  return s;
}

template <typename T, int kBK>
__global__ void __launch_bounds__(kThreads, 1)
    lora_bwd_pipe_kernel(const BwdParams p, const BwdPipeSmem L, const BwdWs W, const int rp, const int tiles_m,
                         const int tiles_k) {
  static_assert(pipe::BN == BKX && kBK % BNR == 0, "the epilogue and dB chunks assume BKX = 128, BK = 32 * h");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async / ldmatrix / bf16 mma need sm_80 (the launcher never picks this kernel below it)
#else
  extern __shared__ __align__(128) unsigned char smem[];
  bool* last_flag = reinterpret_cast<bool*>(smem + L.total);
  T* ring = reinterpret_cast<T*>(smem + L.ring);
  float* XAs = reinterpret_cast<float*>(smem + L.xas);  // GBs after the loop
  const int ldx = rp + 4;
  int mt, kc;
  pipe::swizzle_tile(static_cast<int>(blockIdx.x), tiles_m, tiles_k, mt, kc);
  const int64_t m0 = int64_t(mt) * pipe::BM, k0 = int64_t(kc) * BKX;
  const int64_t M = p.M, N = p.N, r = p.r;
  const int tid = threadIdx.x;
  const bool col0 = kc == 0;

  if (col0) {
    for (int e = tid; e < pipe::BM * rp; e += kThreads) {
      const int i = e / rp, j = e % rp;
      XAs[i * ldx + j] = (m0 + i < M && j < r) ? operand_round<T>(p.xa[(m0 + i) * r + j]) : 0.0f;
    }
  }  // visible to the dB hook after the main loop's first barrier

  pipe::LoopArgs g;
  g.a = p.g, g.sa = p.stride_g_m, g.a_rows = M, g.m0 = m0;
  g.b = p.w, g.sb = p.K, g.b_out = p.K, g.n0 = k0;
  g.red = N, g.do_b = p.dx != nullptr, g.rp = rp;
  const void* b_ad = p.b;
  const int adt = p.adapter_dtype;
  // LoRA operand: Bᵀ, element (j, n) = B[n, j]
  auto lora_val = [=](int j, int64_t n) { return (j < r && n < N) ? load_dyn(b_ad, n * r + j, adt) : 0.0f; };
  auto pre = [](const T*, int) -> const T* { return nullptr; };
  // dB / db in chunks of BNR = 32 columns of the staged G tile (the counters of the atomic mode are per chunk)
  auto post = [&](const T* Gs, int kt) {
    if (!col0) return;
#pragma unroll 1
    for (int h = 0; h < kBK / BNR; ++h) {
      const int64_t n0 = int64_t(kt) * kBK + h * BNR;
      if (n0 < N)
        bwd_db_chunk<T, pipe::BM>(p, W, Gs + h * BNR, pipe::Cfg<kBK>::LDA, XAs, ldx, mt, n0, tiles_m, last_flag);
    }
  };

  pipe::Acc acc;
  pipe::main_loop<T, true, kBK>(acc, g, ring, lora_val, pre, post);

  float* Cs = reinterpret_cast<float*>(smem + L.cs);
  float* Ac = reinterpret_cast<float*>(smem + L.ac);
  float* GBs = XAs;
  pipe::store_acc(acc, Cs, LDC, GBs, ldx, rp);
  __syncthreads();
  bwd_epilogue<T, pipe::BM>(p, W, Cs, Ac, GBs, ldx, mt, k0, kc, tiles_m, last_flag);
#endif
}

const char* bwd_simple_reason(const BwdParams& p, int rp) {
  if (kernel_policy() == KernelPolicy::kSimple) return "simple (LORA_KERNELS_CUDA_KERNEL=simple)";
  if (p.act_dtype == kFloat32) return "simple (fp32 activations: SIMT FMAs)";
  if (rp > pipe::RP_MAX) return "simple (r > 64)";
  if (!pipe::cp_async_ok(p.g, p.stride_g_m, p.stride_g_n, p.N))
    return "simple (grad_y rows not 16-byte aligned: stride_g_n != 1 (e.g. an expanded grad), or stride_g_m, N or "
           "the address not a multiple of 8 elements)";
  if (p.dx != nullptr && !pipe::cp_async_ok(p.w, p.K, 1, p.K)) return "simple (weight not 16-byte aligned: K % 8 != 0)";
  return nullptr;
}

}  // namespace

int64_t bwd_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t r, bool deterministic) {
  return bwd_ws_layout(M, N, K, r, deterministic).total_floats * int64_t(sizeof(float));
}

void launch_bwd(const BwdParams& p, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int rp = static_cast<int>(round_up(p.r, 16));
  const char* why_simple = p.M == 0 ? "none (M = 0: memsets only)" : bwd_simple_reason(p, rp);
  const bool piped = why_simple == nullptr;
  int bk = piped ? pipe_bk() : 32;
  // BK=64's backward needs ~166 KB of shared memory: more than sm_80's opt-in limit (163 KB) -> BK=32 there
  if (piped && bk == 64 && bwd_pipe_layout<__half, 64>().total + 16 > device_smem_optin()) bk = 32;
  record_path(1, !piped            ? why_simple
                 : bk == 64        ? "pipelined (BK=64)"
                 : pipe_bk() == 64 ? "pipelined (BK=32: BK=64 needs more shared memory than this device allows)"
                                   : "pipelined");
  const BwdWs W = bwd_ws_layout(p.M, p.N, p.K, p.r, p.deterministic, piped ? pipe::BM : BM);
  if (p.M == 0) {
    // No rows: dX is empty; dA, dB, db are zero. Plain memsets, no kernel launch.
    if (p.da) cudaMemsetAsync(p.da, 0, p.r * p.K * (p.adapter_dtype == kFloat32 ? 4 : 2), stream);
    if (p.db) cudaMemsetAsync(p.db, 0, p.N * p.r * (p.adapter_dtype == kFloat32 ? 4 : 2), stream);
    if (p.dbias) cudaMemsetAsync(p.dbias, 0, p.N * (p.act_dtype == kFloat32 ? 4 : 2), stream);
    check_last_error("lora_bwd");
    return;
  }
  if (!p.deterministic) {
    // Zero the atomic accumulators and counters: a memset node, not a kernel launch.
    cudaMemsetAsync(p.ws, 0, W.total_floats * sizeof(float), stream);
    check_last_error("lora_bwd (workspace memset)");
  }
  if (piped) {
    const int tiles_m = static_cast<int>(cdiv(p.M, pipe::BM)), tiles_k = static_cast<int>(cdiv(p.K, BKX));
    const dim3 grid(static_cast<unsigned>(tiles_m) * static_cast<unsigned>(tiles_k));
    LORA_DISPATCH_ACT_DTYPE_16(p.act_dtype, T, {
      LORA_DISPATCH_BK(bk, BKV, {
        const BwdPipeSmem L = bwd_pipe_layout<T, BKV>();
        const size_t smem = L.total + 16;
        set_smem_limit("lora_bwd", reinterpret_cast<const void*>(&lora_bwd_pipe_kernel<T, BKV>), smem);
        lora_bwd_pipe_kernel<T, BKV><<<grid, kThreads, smem, stream>>>(p, L, W, rp, tiles_m, tiles_k);
      });
    });
  } else {
    const dim3 grid(static_cast<unsigned>(cdiv(p.M, BM)), static_cast<unsigned>(cdiv(p.K, BKX)));
    LORA_DISPATCH_ACT_DTYPE(p.act_dtype, T, {
      const BwdSmem L = bwd_smem_layout<T>(rp);
      const size_t smem = L.total + 16;
      LORA_DISPATCH_RANK(rp, F, {
        set_smem_limit("lora_bwd", reinterpret_cast<const void*>(&lora_bwd_kernel<T, F>), smem);
        lora_bwd_kernel<T, F><<<grid, kThreads, smem, stream>>>(p, L, W, rp);
      });
    });
  }
  check_last_error("lora_bwd");
  if (p.deterministic) {
    const int64_t total = p.r * p.K + p.N * p.r + (p.dbias ? p.N : 0);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(cdiv(total, kThreads), 4096));
    lora_bwd_reduce<<<blocks, kThreads, 0, stream>>>(p, W);
    check_last_error("lora_bwd (deterministic reduce)");
  }
}

}  // namespace lora
