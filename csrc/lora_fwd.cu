// Fused LoRA forward, one launch:   Y = X Wᵀ + b + s · XA Bᵀ,   XA = (X ⊙ Z) Aᵀ  (fp32, stored for backward)
//
// Grid: (cdiv(M, BM), cdiv(N, BN)); one block of 8 warps owns the [BM=64, BN=128] tile of Y.
//
//   for k0 in 0..K step BK=32:                       (main loop, tensor cores for fp16/bf16)
//       Xs  <- X[m0:m0+64, k0:k0+32]                  predicated, strided (stride_x_m, stride_x_k)
//       Xds <- Xs ⊙ Z / (1-p)                          only with dropout; Z from the shared hash of (m, k)
//       Ws  <- W[n0:n0+128, k0:k0+32]
//       As  <- A[0:RP, k0:k0+32]                       RP = r rounded up to 16, zero rows past r
//       acc   += Xs  · Wsᵀ      warp (wm, wn) of the 2x4 warp grid owns rows 32*wm.., cols 32*wn.. (2x2 frags)
//       accXA += Xds · Asᵀ      the 4 x RP/16 fragments of [64, RP] dealt round-robin to the 8 warps (<= 8 each)
//   epilogue (fp32, SIMT):
//       Cs <- acc, XAs <- accXA (shared memory, fp32)
//       blocks of column 0 store XA[m0:m0+64, :r]
//       Y = Cs + s · XAs Bᵀ + b,  B streamed through shared memory in chunks of 32 ranks, cast at store
//
// Every block recomputes its rows' XA (extra MMA work RP/BN: 12.5% at r=16). The LoRA epilogue runs in fp32
// FMAs on XA itself (not XA rounded to bf16 as an unfused bf16 matmul would), costing r·BM·BN FMAs per block:
// ~1/16 of the tensor-core main loop at K=4096, r=16.
#include <algorithm>

#include "lora_common.cuh"
#include "lora_pipe.cuh"

namespace lora {
namespace {

constexpr int BM = 64, BN = 128, BK = 32;
constexpr int LDT = BK + 8;  // 16-bit WMMA needs ld % 8 == 0; +8 also breaks bank conflicts of the row reads
constexpr int LDC = BN + 4;  // fp32 accumulator staging, ld % 4 == 0 for store_matrix_sync
constexpr int JC = 32;       // rank chunk of B staged in the epilogue
constexpr int LDB = JC + 1;  // odd stride: conflict-free column reads of Bc

struct FwdSmem {
  size_t xs, xds, ws, as, main_end;  // main loop, T
  size_t cs, xas, bc, epi_end;       // epilogue, fp32 (aliases the main loop region)
};

template <typename T>
FwdSmem fwd_smem_layout(int rp) {
  FwdSmem s;
  s.xs = 0;
  s.xds = s.xs + align128(sizeof(T) * BM * LDT);
  s.ws = s.xds + align128(sizeof(T) * BM * LDT);
  s.as = s.ws + align128(sizeof(T) * BN * LDT);
  s.main_end = s.as + align128(sizeof(T) * rp * LDT);
  s.cs = 0;
  s.xas = s.cs + align128(sizeof(float) * BM * LDC);
  s.bc = s.xas + align128(sizeof(float) * BM * (rp + 4));
  s.epi_end = s.bc + align128(sizeof(float) * BN * LDB);
  return s;
}

// Epilogue shared by both main loops. In: Cs = X Wᵀ tile [kBM][LDC] and XAs = XA rows [kBM][ldxa], fp32 in shared
// memory; Bc scratch for the B chunks. The CTAs of column 0 store XA; every CTA writes Y = Cs + s · XAs Bᵀ + b.
template <typename T, int kBM>
__device__ __forceinline__ void fwd_epilogue(const FwdParams& p, const float* Cs, const float* XAs, float* Bc,
                                             const int ldxa, const int64_t m0, const int64_t n0, const bool col0) {
  constexpr int BM = kBM;
  const int64_t M = p.M, N = p.N, r = p.r;
  const int tid = threadIdx.x;
  if (col0) {
    for (int64_t e = tid; e < BM * r; e += kThreads) {
      const int64_t i = e / r, j = e % r;
      if (m0 + i < M) p.xa[(m0 + i) * r + j] = XAs[i * ldxa + j];
    }
  }

  // LoRA term: thread owns column tn and rows tm + 2*i (i < BM/2) of the tile.
  const int tn = tid & (BN - 1), tm = tid >> 7;
  float lacc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) lacc[i] = 0.0f;
  for (int64_t j0 = 0; j0 < r; j0 += JC) {
    __syncthreads();  // previous chunk fully consumed
    for (int e = tid; e < BN * JC; e += kThreads) {
      const int nn = e / JC, jj = e % JC;
      const int64_t n = n0 + nn, j = j0 + jj;
      Bc[nn * LDB + jj] = (n < N && j < r) ? load_dyn(p.b, n * r + j, p.adapter_dtype) : 0.0f;
    }
    __syncthreads();
    const int jn = static_cast<int>(r - j0 < JC ? r - j0 : JC);
    for (int jj = 0; jj < jn; ++jj) {
      const float bv = Bc[tn * LDB + jj];
#pragma unroll
      for (int i = 0; i < BM / 2; ++i) lacc[i] = fmaf(XAs[(tm + 2 * i) * ldxa + j0 + jj], bv, lacc[i]);
    }
  }
  const int64_t n = n0 + tn;
  if (n < N) {
    const float bias_v = p.bias ? to_f32(static_cast<const T*>(p.bias)[n]) : 0.0f;
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) {
      const int64_t m = m0 + tm + 2 * i;
      if (m < M) y[m * N + n] = from_f32<T>(Cs[(tm + 2 * i) * LDC + tn] + p.scale * lacc[i] + bias_v);
    }
  }
}

template <typename T, int kMaxXaFrags>
__global__ void __launch_bounds__(kThreads, kMaxXaFrags <= 2 ? 2 : 1)
    lora_fwd_kernel(const FwdParams p, const FwdSmem L, const int rp) {
  using Mma = WarpMma<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Xs = reinterpret_cast<T*>(smem + L.xs);
  T* Xds = reinterpret_cast<T*>(smem + L.xds);
  T* Ws = reinterpret_cast<T*>(smem + L.ws);
  T* As = reinterpret_cast<T*>(smem + L.as);

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const int64_t M = p.M, N = p.N, K = p.K, r = p.r;
  const int64_t m0 = int64_t(blockIdx.x) * BM, n0 = int64_t(blockIdx.y) * BN;
  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  const int n_xa_frags = 4 * (rp / 16);
  const bool drop = p.drop.enabled;
  const T* Xl = drop ? Xds : Xs;  // the LoRA branch reads the dropped tile

  typename Mma::Acc acc[2][2], acc_xa[kMaxXaFrags];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) Mma::zero(acc[i][j]);
#pragma unroll
  for (int f = 0; f < kMaxXaFrags; ++f) Mma::zero(acc_xa[f]);

  // 16-byte loads where the layout allows (contiguous rows, K a multiple of 8 fp16 / 4 fp32 elements)
  constexpr int V = Vec<T>::N, VPR = BK / V;  // vectors per tile row
  const bool x_vec = rows_vectorizable(x, p.stride_x_m, p.stride_x_k);
  const bool w_vec = rows_vectorizable(w, K, int64_t(1));

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int e = tid; e < BM * VPR; e += kThreads) {
      const int i = e / VPR, kk = (e % VPR) * V;
      const int64_t gm = m0 + i, gk = k0 + kk;
      Vec<T> v;
      load_vec(v, x, gm, gk, M, K, p.stride_x_m, p.stride_x_k, x_vec);
      store_vec_smem(Xs + i * LDT + kk, v);
      if (drop) {
#pragma unroll
        for (int t = 0; t < V; ++t) {
          const bool keep = gm < M && gk + t < K && dropout_keep(p.drop, gm, gk + t, K);
          v.v[t] = from_f32<T>(keep ? to_f32(v.v[t]) * p.drop.inv_keep : 0.0f);
        }
        store_vec_smem(Xds + i * LDT + kk, v);
      }
    }
    for (int e = tid; e < BN * VPR; e += kThreads) {
      const int j = e / VPR, kk = (e % VPR) * V;
      Vec<T> v;
      load_vec(v, w, n0 + j, k0 + kk, N, K, K, int64_t(1), w_vec);
      store_vec_smem(Ws + j * LDT + kk, v);
    }
    for (int e = tid; e < rp * BK; e += kThreads) {
      const int j = e / BK, kk = e % BK;
      const int64_t gk = k0 + kk;
      As[j * LDT + kk] = from_f32<T>((j < r && gk < K) ? load_dyn(p.a, j * K + gk, p.adapter_dtype) : 0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          Mma::mma(acc[i][j], Xs + (wm * 32 + i * 16) * LDT + kk, LDT, Ws + (wn * 32 + j * 16) * LDT + kk, LDT);
#pragma unroll
      for (int f = 0; f < kMaxXaFrags; ++f) {
        const int fi = warp + 8 * f;
        if (fi < n_xa_frags)
          Mma::mma(acc_xa[f], Xl + (fi & 3) * 16 * LDT + kk, LDT, As + (fi >> 2) * 16 * LDT + kk, LDT);
      }
    }
    __syncthreads();
  }

  // ---- epilogue: stage accumulators in fp32 shared memory (aliases the tiles: the loop ended on a barrier)
  float* Cs = reinterpret_cast<float*>(smem + L.cs);
  float* XAs = reinterpret_cast<float*>(smem + L.xas);
  float* Bc = reinterpret_cast<float*>(smem + L.bc);
  const int ldxa = rp + 4;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) Mma::store(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, LDC, acc[i][j]);
#pragma unroll
  for (int f = 0; f < kMaxXaFrags; ++f) {
    const int fi = warp + 8 * f;
    if (fi < n_xa_frags) Mma::store(XAs + (fi & 3) * 16 * ldxa + (fi >> 2) * 16, ldxa, acc_xa[f]);
  }
  __syncthreads();

  fwd_epilogue<T, BM>(p, Cs, XAs, Bc, ldxa, m0, n0, blockIdx.y == 0);
}

// ---- pipelined kernel (fp16/bf16, r <= 64, 16-byte aligned rows): lora_pipe.cuh's main loop on a [128, 128] tile
// of Y, 1-D grid in grouped order. Shared memory: the cp.async ring + the dropped X tile (main loop), aliased by the
// fp32 epilogue (Cs, XAs, Bc) exactly as in the simple kernel.
struct FwdPipeSmem {
  size_t ring, xd, main_end, cs, xas, bc, epi_end;
};

template <typename T, int kBK>
FwdPipeSmem fwd_pipe_layout() {
  using Lay = pipe::Layout<false, kBK>;
  FwdPipeSmem s;
  s.ring = 0;
  s.xd = s.ring + align128(sizeof(T) * pipe::Cfg<kBK>::STAGES * Lay::STAGE_ELEMS);
  s.main_end = s.xd + align128(sizeof(T) * pipe::BM * Lay::LDA);
  s.cs = 0;
  s.xas = s.cs + align128(sizeof(float) * pipe::BM * LDC);
  s.bc = s.xas + align128(sizeof(float) * pipe::BM * (pipe::RP_MAX + 4));
  s.epi_end = s.bc + align128(sizeof(float) * BN * LDB);
  return s;
}

template <typename T, int kBK>
__global__ void __launch_bounds__(kThreads, 1)
    lora_fwd_pipe_kernel(const FwdParams p, const FwdPipeSmem L, const int rp, const int tiles_m, const int tiles_n) {
  static_assert(pipe::BN == BN, "the epilogue's column layout assumes BN = 128");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async / ldmatrix / bf16 mma need sm_80 (the launcher never picks this kernel below it)
#else
  extern __shared__ __align__(128) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem + L.ring);
  T* Xd = reinterpret_cast<T*>(smem + L.xd);
  int mt, nt;
  pipe::swizzle_tile(static_cast<int>(blockIdx.x), tiles_m, tiles_n, mt, nt);
  const int64_t m0 = int64_t(mt) * pipe::BM, n0 = int64_t(nt) * BN;
  const int64_t M = p.M, K = p.K, r = p.r;
  const int tid = threadIdx.x;

  pipe::LoopArgs g;
  g.a = p.x, g.sa = p.stride_x_m, g.a_rows = M, g.m0 = m0;
  g.b = p.w, g.sb = K, g.b_out = p.N, g.n0 = n0;
  g.red = K, g.do_b = true, g.rp = rp;
  const void* a_ad = p.a;
  const int adt = p.adapter_dtype;
  auto lora_val = [=](int j, int64_t k) { return (j < r && k < K) ? load_dyn(a_ad, j * K + k, adt) : 0.0f; };
  constexpr int LDA = pipe::Cfg<kBK>::LDA, CPR = pipe::Cfg<kBK>::CPR;
  // Dropout: Xd = X ⊙ Z / (1-p) from the landed X tile, element (m, k) masked by the same hash as the simple kernel.
  auto pre = [&](const T* As, int kt) -> const T* {
    if (!p.drop.enabled) return nullptr;
#pragma unroll
    for (int i = 0; i < pipe::BM * CPR / kThreads; ++i) {
      const int c = tid + i * kThreads, row = c / CPR, ch = (c % CPR) * 8;
      const int64_t gm = m0 + row, gk = int64_t(kt) * kBK + ch;
      Vec<T> v;
      *reinterpret_cast<uint4*>(v.v) = *reinterpret_cast<const uint4*>(As + row * LDA + ch);
#pragma unroll
      for (int t = 0; t < Vec<T>::N; ++t) {
        const bool keep = gm < M && gk + t < K && dropout_keep(p.drop, gm, gk + t, K);
        v.v[t] = from_f32<T>(keep ? to_f32(v.v[t]) * p.drop.inv_keep : 0.0f);
      }
      store_vec_smem(Xd + row * LDA + ch, v);
    }
    __syncthreads();  // Xd complete before the LoRA MMAs; rewritten only after the next tile's barrier
    return Xd;
  };
  auto post = [](const T*, int) {};

  pipe::Acc acc;
  pipe::main_loop<T, false, kBK>(acc, g, ring, lora_val, pre, post);

  float* Cs = reinterpret_cast<float*>(smem + L.cs);
  float* XAs = reinterpret_cast<float*>(smem + L.xas);
  float* Bc = reinterpret_cast<float*>(smem + L.bc);
  const int ldxa = rp + 4;
  pipe::store_acc(acc, Cs, LDC, XAs, ldxa, rp);
  __syncthreads();
  fwd_epilogue<T, pipe::BM>(p, Cs, XAs, Bc, ldxa, m0, n0, nt == 0);
#endif
}

// Which kernel a call takes, and why (recorded for last_path()).
const char* fwd_simple_reason(const FwdParams& p, int rp) {
  if (kernel_policy() == KernelPolicy::kSimple) return "simple (LORA_KERNELS_CUDA_KERNEL=simple)";
  if (p.act_dtype == kFloat32) return "simple (fp32 activations: SIMT FMAs)";
  if (rp > pipe::RP_MAX) return "simple (r > 64)";
  if (!pipe::cp_async_ok(p.x, p.stride_x_m, p.stride_x_k, p.K))
    return "simple (x rows not 16-byte aligned: stride_x_k != 1, or stride_x_m, K or the address not a multiple of 8 "
           "elements)";
  if (!pipe::cp_async_ok(p.w, p.K, 1, p.K)) return "simple (weight not 16-byte aligned)";
  return nullptr;
}

}  // namespace

void launch_fwd(const FwdParams& p, void* stream) {
  if (p.M == 0) return;  // nothing to compute, no launch
  const int rp = static_cast<int>(round_up(p.r, 16));
  const char* why_simple = fwd_simple_reason(p, rp);
  record_path(0, why_simple ? why_simple : pipe_bk() == 64 ? "pipelined (BK=64)" : "pipelined");
  if (why_simple == nullptr) {
    const int tiles_m = static_cast<int>(cdiv(p.M, pipe::BM)), tiles_n = static_cast<int>(cdiv(p.N, BN));
    const dim3 grid(static_cast<unsigned>(tiles_m) * static_cast<unsigned>(tiles_n));
    LORA_DISPATCH_ACT_DTYPE_16(p.act_dtype, T, {
      LORA_DISPATCH_BK(pipe_bk(), BKV, {
        const FwdPipeSmem L = fwd_pipe_layout<T, BKV>();
        const size_t smem = std::max(L.main_end, L.epi_end);
        set_smem_limit("lora_fwd", reinterpret_cast<const void*>(&lora_fwd_pipe_kernel<T, BKV>), smem);
        lora_fwd_pipe_kernel<T, BKV>
            <<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p, L, rp, tiles_m, tiles_n);
      });
    });
    check_last_error("lora_fwd");
    return;
  }
  const dim3 grid(static_cast<unsigned>(cdiv(p.M, BM)), static_cast<unsigned>(cdiv(p.N, BN)));
  LORA_DISPATCH_ACT_DTYPE(p.act_dtype, T, {
    const FwdSmem L = fwd_smem_layout<T>(rp);
    const size_t smem = std::max(L.main_end, L.epi_end);
    LORA_DISPATCH_RANK(rp, F, {
      set_smem_limit("lora_fwd", reinterpret_cast<const void*>(&lora_fwd_kernel<T, F>), smem);
      lora_fwd_kernel<T, F><<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p, L, rp);
    });
  });
  check_last_error("lora_fwd");
}

}  // namespace lora
