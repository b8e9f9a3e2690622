// cuBLASLt for the big GEMMs of plan "cublas": D = op(A) op(B) + beta C, column-major, C == D (in place).
//
// One cuBLASLt handle per device (created on first use) and one matmul plan per shape class (descriptors and the
// heuristic's algorithm, keyed on dtype, transposes, sizes, leading dimensions, beta and operand alignment),
// cached for the process: after the first call of a shape, a GEMM costs one hash lookup and cublasLtMatmul.
// The workspace comes from the caller (the caching allocator), never from cuBLAS, so the call is capturable.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lora::lt {

struct Gemm {
  int dtype;  // lora::DType of A, B, C, D; fp32 accumulation (CUBLAS_COMPUTE_32F: no tf32 for fp32)
  bool trans_a, trans_b;
  int64_t m, n, k;  // D is m x n, the reduction is k
  int64_t lda, ldb, ldc;
  const void* a;
  const void* b;
  void* c;     // C and D
  float beta;  // 0 or 1 here
};

// Throws std::runtime_error naming `call` (cuBLASLt status name and string, the shape) on any failure.
void matmul(const char* call, const Gemm& g, void* workspace, size_t workspace_bytes, void* stream);
// The cuBLASLt library actually loaded (cublasLtGetVersion) and the header this module was built with.
std::string version_info();
// Number of cached matmul plans (tests: a second call of the same shape adds none).
size_t cached_plans();

}  // namespace lora::lt
