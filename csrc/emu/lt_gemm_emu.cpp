// lt_gemm.h on the host, for the CPU emulation (lora_emu.h): the same column-major contract as cuBLASLt,
// D = op(A) op(B) + beta C with fp32 accumulation and one rounding to the output dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "../lora_api.h"
#include "../lt_gemm.h"

namespace lora::lt {
namespace {

float get(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

void put(void* p, int dtype, int64_t i, float v) {
  if (dtype == kFloat32)
    static_cast<float*>(p)[i] = v;
  else if (dtype == kFloat16)
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

size_t g_calls = 0;

}  // namespace

void matmul(const char* call, const Gemm& g, void*, size_t, void*) {
  if (g.lda < (g.trans_a ? g.k : g.m) || g.ldb < (g.trans_b ? g.n : g.k) || g.ldc < g.m)
    throw std::runtime_error(std::string(call) + ": emulated cuBLASLt: a leading dimension is below its row count");
  for (int64_t j = 0; j < g.n; ++j)
    for (int64_t i = 0; i < g.m; ++i) {
      float acc = 0.0f;
      for (int64_t k = 0; k < g.k; ++k) {
        const float a = get(g.a, g.dtype, g.trans_a ? k + i * g.lda : i + k * g.lda);
        const float b = get(g.b, g.dtype, g.trans_b ? j + k * g.ldb : k + j * g.ldb);
        acc += a * b;
      }
      if (g.beta != 0.0f) acc += g.beta * get(g.c, g.dtype, i + j * g.ldc);
      put(g.c, g.dtype, i + j * g.ldc, acc);
    }
  ++g_calls;
}

std::string version_info() { return "emulated cuBLASLt (CPU test build)"; }
size_t cached_plans() { return g_calls; }

}  // namespace lora::lt
