// cuBLASLt matmul with per-device handles and per-shape cached plans (lt_gemm.h).
#include "lt_gemm.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "lora_api.h"

namespace lora::lt {
namespace {

std::string status_text(cublasStatus_t st) {
  return std::string(cublasLtGetStatusName(st)) + " (" + cublasLtGetStatusString(st) + ")";
}

void check(const char* call, const char* what, cublasStatus_t st) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(call) + ": " + what + " failed: " + status_text(st));
}

cudaDataType_t data_type(int dtype) {
  switch (dtype) {
    case kFloat32:
      return CUDA_R_32F;
    case kFloat16:
      return CUDA_R_16F;
    case kBFloat16:
      return CUDA_R_16BF;
    default:
      throw std::invalid_argument("lora_kernels._C_cublas: unknown dtype code " + std::to_string(dtype));
  }
}

// Largest power of two (<= 256) dividing the address: the alignment cuBLASLt may assume for the operand.
uint32_t alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && (v % a) != 0) a >>= 1;
  return a;
}

struct Key {  // all int64_t: no padding, so bytewise hashing and comparison are exact
  int64_t device, dtype, ta, tb, beta;
  int64_t m, n, k, lda, ldb, ldc;
  int64_t al_a, al_b, al_c;
  bool operator==(const Key& o) const { return std::memcmp(this, &o, sizeof(Key)) == 0; }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    // FNV-1a over the bytes
    const auto* p = reinterpret_cast<const unsigned char*>(&k);
    size_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(Key); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }
};

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

std::mutex g_mutex;
std::vector<cublasLtHandle_t> g_handles;  // per device, created on first use, never destroyed (process lifetime)
std::unordered_map<Key, std::shared_ptr<Plan>, KeyHash> g_plans;

cublasLtHandle_t handle(const char* call, int device) {
  if (device >= static_cast<int>(g_handles.size())) g_handles.resize(device + 1, nullptr);
  if (g_handles[device] == nullptr) check(call, "cublasLtCreate", cublasLtCreate(&g_handles[device]));
  return g_handles[device];
}

std::shared_ptr<Plan> make_plan(const char* call, cublasLtHandle_t h, const Key& key, size_t workspace_bytes) {
  auto plan = std::make_shared<Plan>();
  const cudaDataType_t t = data_type(key.dtype);
  check(call, "cublasLtMatmulDescCreate", cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const int32_t opa = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  check(call, "cublasLtMatmulDescSetAttribute(TRANSA)",
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
  check(call, "cublasLtMatmulDescSetAttribute(TRANSB)",
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
  // stored shapes: A is (ta ? k x m : m x k), B is (tb ? n x k : k x n), column-major
  check(call, "cublasLtMatrixLayoutCreate(A)",
        cublasLtMatrixLayoutCreate(&plan->la, t, key.ta ? key.k : key.m, key.ta ? key.m : key.k, key.lda));
  check(call, "cublasLtMatrixLayoutCreate(B)",
        cublasLtMatrixLayoutCreate(&plan->lb, t, key.tb ? key.n : key.k, key.tb ? key.k : key.n, key.ldb));
  check(call, "cublasLtMatrixLayoutCreate(C)", cublasLtMatrixLayoutCreate(&plan->lc, t, key.m, key.n, key.ldc));

  cublasLtMatmulPreference_t pref = nullptr;
  check(call, "cublasLtMatmulPreferenceCreate", cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = workspace_bytes;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  const uint32_t al[4] = {static_cast<uint32_t>(key.al_a), static_cast<uint32_t>(key.al_b),
                          static_cast<uint32_t>(key.al_c), static_cast<uint32_t>(key.al_c)};
  const cublasLtMatmulPreferenceAttributes_t al_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i) cublasLtMatmulPreferenceSetAttribute(pref, al_attr[i], &al[i], sizeof(uint32_t));
  // split-K only with fp32 partials reduced in a separate step: not "in place" in the output dtype (a bf16 sum per
  // split, and C == D here), not in the output type either
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof(reduction));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(h, plan->desc, plan->la, plan->lb, plan->lc, plan->lc, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    throw std::runtime_error(std::string(call) +
                             ": cuBLASLt has no algorithm for this GEMM (m=" + std::to_string(key.m) +
                             ", n=" + std::to_string(key.n) + ", k=" + std::to_string(key.k) + ", dtype code " +
                             std::to_string(key.dtype) + ", alignments " + std::to_string(key.al_a) + "/" +
                             std::to_string(key.al_b) + "/" + std::to_string(key.al_c) + " bytes): " + status_text(st));
  plan->algo = result.algo;
  plan->workspace = result.workspaceSize;
  return plan;
}

}  // namespace

void matmul(const char* call, const Gemm& g, void* workspace, size_t workspace_bytes, void* stream) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) throw std::runtime_error(std::string(call) + ": cudaGetDevice failed");
  Key key;
  std::memset(&key, 0, sizeof(key));
  key.device = device, key.dtype = g.dtype, key.ta = g.trans_a, key.tb = g.trans_b, key.beta = g.beta != 0.0f ? 1 : 0;
  key.m = g.m, key.n = g.n, key.k = g.k, key.lda = g.lda, key.ldb = g.ldb, key.ldc = g.ldc;
  key.al_a = alignment(g.a), key.al_b = alignment(g.b), key.al_c = alignment(g.c);
  std::shared_ptr<Plan> plan;
  cublasLtHandle_t h = nullptr;
  {
    const std::lock_guard<std::mutex> lock(g_mutex);
    h = handle(call, device);
    auto it = g_plans.find(key);
    if (it == g_plans.end()) it = g_plans.emplace(key, make_plan(call, h, key, workspace_bytes)).first;
    plan = it->second;
  }
  if (plan->workspace > workspace_bytes)
    throw std::runtime_error(std::string(call) + ": the cached cuBLASLt plan needs " + std::to_string(plan->workspace) +
                             " bytes of workspace, the call passed " + std::to_string(workspace_bytes));
  const float alpha = 1.0f, beta = g.beta;
  check(call, "cublasLtMatmul",
        cublasLtMatmul(h, plan->desc, &alpha, g.a, plan->la, g.b, plan->lb, &beta, g.c, plan->lc, g.c, plan->lc,
                       &plan->algo, workspace, workspace_bytes, static_cast<cudaStream_t>(stream)));
}

std::string version_info() {
  const size_t v = cublasLtGetVersion();
  return "cuBLASLt " + std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." +
         std::to_string(v % 100) + " loaded (built against " + std::to_string(CUBLAS_VER_MAJOR) + "." +
         std::to_string(CUBLAS_VER_MINOR) + "." + std::to_string(CUBLAS_VER_PATCH) + ")";
}

size_t cached_plans() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  return g_plans.size();
}

}  // namespace lora::lt
