// Device helpers shared by the forward and backward kernels: dtype conversions, the warp-level 16x16x16 MMA
// (tensor cores through WMMA for fp16/bf16, plain fp32 FMAs for fp32 activations) and the dispatch macro.
#pragma once

#include "emu/lora_emu.h"  // first: with -DLORA_EMULATE (CPU tests of plan "cublas") it redefines the CUDA keywords

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef LORA_EMULATE
#include <mma.h>
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lora_api.h"

namespace lora {

constexpr int kThreads = 256;  // 8 warps per block in every kernel of this file set

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// An fp32 intermediate (XA, GB) as a GEMM operand under the precision contract (lora_kernels/backends/torch/lora.py):
// rounded to the activation dtype T, kept in fp32 registers / shared memory. Identity for T = float.
template <typename T>
__device__ __forceinline__ float operand_round(float v) {
  return to_f32(from_f32<T>(v));
}

// Adapters (and the final gradient stores) have a dtype chosen at run time: fp32 or the activation dtype. They
// are small (r x K, N x r), so a uniform branch per element costs nothing next to the GEMM and saves template
// instances (compile time).
__device__ __forceinline__ float load_dyn(const void* p, int64_t i, int code) {
  if (code == kFloat32) return static_cast<const float*>(p)[i];
  if (code == kFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void store_dyn(void* p, int64_t i, float v, int code) {
  if (code == kFloat32)
    static_cast<float*>(p)[i] = v;
  else if (code == kFloat16)
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

// C[16x16] (fp32) += A[16 x 16] * B[16 x 16] for one warp, operands in shared memory:
//   A row-major:  a[i * lda + kk]   (i: row of C, kk: reduction index)
//   B "col-major": b[j * ldb + kk]  (j: column of C), i.e. B is stored as its transpose, rows of length >= 16.
// store() writes C row-major to fp32 shared memory. WMMA requires lda/ldb multiples of 8 (16-bit types), ldc a
// multiple of 4, and 32-byte aligned pointers: the smem layouts below keep all three.
template <typename T>
struct WarpMma;

#ifndef LORA_EMULATE  // no WMMA on the host: the emulated kernels use TileMma's SIMT scheme (cublas_plan.cu)
template <typename T>
struct WarpMmaWmma {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  __device__ __forceinline__ static void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }
  __device__ __forceinline__ static void mma(Acc& c, const T* a, int lda, const T* b, int ldb) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major> fb;
    nvcuda::wmma::load_matrix_sync(fa, a, lda);
    nvcuda::wmma::load_matrix_sync(fb, b, ldb);
    nvcuda::wmma::mma_sync(c, fa, fb, c);
  }
  __device__ __forceinline__ static void store(float* c_smem, int ldc, const Acc& c) {
    nvcuda::wmma::store_matrix_sync(c_smem, c, ldc, nvcuda::wmma::mem_row_major);
  }
};

template <>
struct WarpMma<__half> : WarpMmaWmma<__half> {};
template <>
struct WarpMma<__nv_bfloat16> : WarpMmaWmma<__nv_bfloat16> {};
#endif

// fp32 activations: SIMT, exact fp32 FMAs (no tf32, so results match torch's fp32 matmul with tf32 off).
// Lane l owns row l/2 and columns (l%2)*8 .. +8 of the 16x16 tile.
template <>
struct WarpMma<float> {
  struct Acc {
    float v[8];
  };
  __device__ __forceinline__ static void zero(Acc& c) {
#pragma unroll
    for (int j = 0; j < 8; ++j) c.v[j] = 0.0f;
  }
  __device__ __forceinline__ static void mma(Acc& c, const float* a, int lda, const float* b, int ldb) {
    const int lane = threadIdx.x & 31;
    const float* arow = a + (lane >> 1) * lda;
    const float* bcol = b + ((lane & 1) * 8) * ldb;
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      const float av = arow[kk];
#pragma unroll
      for (int j = 0; j < 8; ++j) c.v[j] = fmaf(av, bcol[j * ldb + kk], c.v[j]);
    }
  }
  __device__ __forceinline__ static void store(float* c_smem, int ldc, const Acc& c) {
    const int lane = threadIdx.x & 31;
    float* row = c_smem + (lane >> 1) * ldc + (lane & 1) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) row[j] = c.v[j];
  }
};

// Element of a strided 2-D activation tensor, 0 outside [rows, cols): the predicated tail of every tile load.
template <typename T>
__device__ __forceinline__ float load_2d(const T* p, int64_t i, int64_t j, int64_t rows, int64_t cols, int64_t si,
                                         int64_t sj) {
  return (i < rows && j < cols) ? to_f32(p[i * si + j * sj]) : 0.0f;
}

// VEC consecutive elements of one row, moved as one 16-byte access when possible.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Whether rows of a strided 2-D tensor can be read with 16-byte loads: unit inner stride, row stride and base
// address multiples of 16 bytes. Uniform per launch.
template <typename T>
__device__ __forceinline__ bool rows_vectorizable(const T* p, int64_t si, int64_t sj) {
  return sj == 1 && si % Vec<T>::N == 0 && (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// out = p[i, j : j + VEC] (row i, strides si/sj), zero outside [rows, cols). One 16-byte load when `vec_ok` and
// the whole vector is in bounds (j is always a multiple of VEC here), else element by element: the tails of M and
// K, odd row strides and strided inputs take the scalar path.
template <typename T>
__device__ __forceinline__ void load_vec(Vec<T>& out, const T* p, int64_t i, int64_t j, int64_t rows, int64_t cols,
                                         int64_t si, int64_t sj, bool vec_ok) {
  constexpr int V = Vec<T>::N;
  if (vec_ok && i < rows && j + V <= cols) {
    *reinterpret_cast<uint4*>(out.v) = *reinterpret_cast<const uint4*>(p + i * si + j);
  } else {
#pragma unroll
    for (int t = 0; t < V; ++t) out.v[t] = (i < rows && j + t < cols) ? p[i * si + (j + t) * sj] : from_f32<T>(0.0f);
  }
}

template <typename T>
__device__ __forceinline__ void store_vec_smem(T* dst, const Vec<T>& v) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v.v);
}

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) & ~size_t(127); }

}  // namespace lora

// The cases of the 16-bit activation dtypes, shared by the two dispatch switches below.
#define LORA_CASES_16BIT(T, ...) \
  case ::lora::kFloat16: {       \
    using T = __half;            \
    __VA_ARGS__;                 \
    break;                       \
  }                              \
  case ::lora::kBFloat16: {      \
    using T = __nv_bfloat16;     \
    __VA_ARGS__;                 \
    break;                       \
  }

// One template instance per activation dtype; everything else (adapter dtype, bias, dropout, rank) is a run-time
// argument. Three instances per kernel keep the two-arch build well under a minute per translation unit.
#define LORA_DISPATCH_ACT_DTYPE(code, T, ...)                                                                \
  switch (code) {                                                                                            \
    case ::lora::kFloat32: {                                                                                 \
      using T = float;                                                                                       \
      __VA_ARGS__;                                                                                           \
      break;                                                                                                 \
    }                                                                                                        \
      LORA_CASES_16BIT(T, __VA_ARGS__)                                                                       \
    default:                                                                                                 \
      throw std::invalid_argument("lora_kernels._C: unknown activation dtype code " + std::to_string(code)); \
  }

// The 16-bit activation dtypes only (the pipelined kernels: tensor-core operands through ldmatrix).
#define LORA_DISPATCH_ACT_DTYPE_16(code, T, ...)                                                               \
  switch (code) {                                                                                              \
    LORA_CASES_16BIT(T, __VA_ARGS__)                                                                           \
    default:                                                                                                   \
      throw std::invalid_argument("lora_kernels._C: no 16-bit kernel for dtype code " + std::to_string(code)); \
  }

// Register budget of the rank-dependent accumulators (XA in the forward, GB in the backward): the 4 x RP/16
// fragments of a 64-row block over 8 warps are RP/32 per warp. Ranks up to 64 (the common case) get an instance
// with 2 fragments per warp that fits 128 registers, i.e. two blocks (16 warps) per SM; up to 256 ranks get 8
// fragments per warp (~170 registers, one block per SM).
#define LORA_DISPATCH_RANK(rp, F, ...) \
  if ((rp) <= 64) {                    \
    constexpr int F = 2;               \
    __VA_ARGS__;                       \
  } else {                             \
    constexpr int F = 8;               \
    __VA_ARGS__;                       \
  }
