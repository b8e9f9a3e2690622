// lora_kernels._C_cublas: the torch-free pybind11 boundary of plan "cublas" (cublas_plan.h).
//
// Like lora_kernels._C (binding.cpp): every tensor is a raw device address (int) with sizes, row strides (the
// inner stride must be 1: the caller makes rows contiguous), dtype codes (0 float32, 1 float16, 2 bfloat16), the
// device index and the cudaStream_t as ints. Everything is validated here before any CUDA call, with messages
// naming the argument (ValueError); CUDA / cuBLASLt failures, "no device" included, become RuntimeError prefixed
// with the call's name. Importing the module touches no CUDA API; it needs libcublasLt.so.<major> to load
// (lora_kernels/backends/cuda/cublas.py finds it, or reports why not).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "cublas_plan.h"
#include "lora_api.h"
#include "lt_gemm.h"

namespace py = pybind11;

namespace {

[[noreturn]] void bad(const char* call, const std::string& msg) {
  throw std::invalid_argument(std::string(call) + ": " + msg);
}

std::string str(int64_t v) { return std::to_string(v); }

const void* ptr(uint64_t v) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(v)); }
void* mut(uint64_t v) { return reinterpret_cast<void*>(static_cast<uintptr_t>(v)); }

void check_sizes(const char* call, int64_t M, int64_t N, int64_t K, int64_t r) {
  if (M < 0) bad(call, "M (rows of x) must be >= 0, got " + str(M));
  if (N < 1) bad(call, "N (out_features) must be >= 1, got " + str(N));
  if (K < 1) bad(call, "K (in_features) must be >= 1, got " + str(K));
  if (r < 1 || r > lora::plan::kMaxRank)
    bad(call, "r (LoRA rank) must be in [1, " + str(lora::plan::kMaxRank) + "] for plan 'cublas', got " + str(r));
  // grid limits: the forward lowrank_add kernel has one CTA row per 64 rows (gridDim.y <= 65535), column tiles of 128
  if ((M + lora::plan::kRowBlock - 1) / lora::plan::kRowBlock > 65535)
    bad(call, "M (rows of x) must be <= " + str(int64_t(65535) * lora::plan::kRowBlock) + " for plan 'cublas', got " +
                  str(M));
  if (N > (int64_t(1) << 31) || K > (int64_t(1) << 31)) bad(call, "N and K must be < 2**31");
}

// Row stride of an [rows, cols] operand with unit inner stride: >= cols (cuBLASLt's leading dimension).
void check_ld(const char* call, const char* name, int64_t ld, int64_t cols) {
  if (ld < cols) bad(call, std::string(name) + " (row stride) must be >= " + str(cols) + ", got " + str(ld));
}

void check_dtypes(const char* call, int act, int adapter) {
  lora::dtype_bytes(call, "act_dtype", act);
  lora::dtype_bytes(call, "adapter_dtype", adapter);
  if (adapter != lora::kFloat32 && adapter != act)
    bad(call, "adapter_dtype must be 0 (float32) or equal to act_dtype (" + std::to_string(act) + "), got " +
                  std::to_string(adapter));
}

lora::DropoutParams dropout_params(const char* call, bool enabled, uint64_t seed, uint64_t offset, uint64_t threshold,
                                   double inv_keep) {
  if (threshold > 0xFFFFFFFFull) bad(call, "threshold must fit in 32 bits, got " + std::to_string(threshold));
  if (enabled && !(std::isfinite(inv_keep) && inv_keep >= 1.0))
    bad(call, "inv_keep (1 / (1 - p)) must be a finite float >= 1, got " + std::to_string(inv_keep));
  if (offset >= (1ull << 63)) bad(call, "offset must be < 2**63, got " + std::to_string(offset));
  return lora::make_dropout_params(enabled, seed, offset, static_cast<uint32_t>(threshold), inv_keep);
}

void check_workspace(const char* call, uint64_t ws, int64_t bytes, int64_t need, const char* fn) {
  if (ws == 0 || (ws & 255) != 0) bad(call, "workspace must be a non-null device pointer aligned to 256 bytes");
  if (bytes < need)
    bad(call, std::string("workspace_bytes must be >= ") + fn + "(M, N, K, r) = " + str(need) + ", got " + str(bytes));
}

void on_device(const char* call, int device, std::initializer_list<std::pair<const char*, uint64_t>> ptrs) {
  for (const auto& [name, v] : ptrs) lora::check_on_device(call, name, ptr(v), device);
}

void fwd(uint64_t x, int64_t stride_x_m, uint64_t weight, uint64_t bias, uint64_t lora_a, uint64_t lora_b, uint64_t y,
         uint64_t xa, uint64_t workspace, int64_t workspace_bytes, int64_t M, int64_t N, int64_t K, int64_t r,
         int act_dtype, int adapter_dtype, double scale, bool dropout, uint64_t seed, uint64_t offset,
         uint64_t threshold, double inv_keep, int device, uint64_t stream) {
  const char* call = "lora_kernels._C_cublas.fwd";
  check_sizes(call, M, N, K, r);
  check_dtypes(call, act_dtype, adapter_dtype);
  if (M > 0) check_ld(call, "stride_x_m", stride_x_m, K);
  if (!std::isfinite(scale)) bad(call, "scale must be finite, got " + std::to_string(scale));
  const int64_t ea = lora::dtype_bytes(call, "act_dtype", act_dtype);
  const int64_t ed = lora::dtype_bytes(call, "adapter_dtype", adapter_dtype);
  lora::check_pointer(call, "x", ptr(x), ea, M == 0);  // empty tensors may have no storage
  lora::check_pointer(call, "weight", ptr(weight), ea, false);
  lora::check_pointer(call, "bias", ptr(bias), ea, true);
  lora::check_pointer(call, "lora_a", ptr(lora_a), ed, false);
  lora::check_pointer(call, "lora_b", ptr(lora_b), ed, false);
  lora::check_pointer(call, "y", ptr(y), ea, M == 0);
  lora::check_pointer(call, "xa", ptr(xa), 4, M == 0);
  if (M > 0)
    check_workspace(call, workspace, workspace_bytes, lora::plan::fwd_workspace_bytes(M, N, K, r),
                    "fwd_workspace_bytes");

  lora::plan::FwdArgs p{};
  p.x = ptr(x), p.w = ptr(weight), p.bias = ptr(bias), p.a = ptr(lora_a), p.b = ptr(lora_b);
  p.y = mut(y), p.xa = static_cast<float*>(mut(xa)), p.ws = mut(workspace), p.ws_bytes = workspace_bytes;
  p.M = M, p.N = N, p.K = K, p.r = r, p.ldx = stride_x_m;
  p.act_dtype = act_dtype, p.adapter_dtype = adapter_dtype, p.scale = static_cast<float>(scale);
  p.drop = dropout_params(call, dropout, seed, offset, threshold, inv_keep);

  const lora::DeviceGuard guard(call, device);
  on_device(call, device,
            {{"x", x},
             {"weight", weight},
             {"bias", bias},
             {"lora_a", lora_a},
             {"lora_b", lora_b},
             {"y", y},
             {"xa", xa},
             {"workspace", workspace}});
  lora::plan::run_fwd(call, p, mut(stream));
}

void bwd(uint64_t grad_y, int64_t stride_g_m, uint64_t x, int64_t stride_x_m, uint64_t weight, uint64_t lora_a,
         uint64_t lora_b, uint64_t xa, uint64_t grad_x, uint64_t grad_flat, int64_t grad_flat_len, int64_t off_da,
         int64_t off_db, int64_t off_dbias, uint64_t workspace, int64_t workspace_bytes, int64_t M, int64_t N,
         int64_t K, int64_t r, int act_dtype, int adapter_dtype, double scale, bool dropout, uint64_t seed,
         uint64_t offset, uint64_t threshold, double inv_keep, int device, uint64_t stream) {
  const char* call = "lora_kernels._C_cublas.bwd";
  check_sizes(call, M, N, K, r);
  check_dtypes(call, act_dtype, adapter_dtype);
  if (M > 0) check_ld(call, "stride_g_m", stride_g_m, N);
  if (M > 0) check_ld(call, "stride_x_m", stride_x_m, K);
  if (!std::isfinite(scale)) bad(call, "scale must be finite, got " + std::to_string(scale));
  const int64_t ea = lora::dtype_bytes(call, "act_dtype", act_dtype);
  const int64_t ed = lora::dtype_bytes(call, "adapter_dtype", adapter_dtype);
  if (grad_flat_len < 0) bad(call, "grad_flat_len must be >= 0, got " + str(grad_flat_len));
  for (auto [name, off, len] : {std::tuple<const char*, int64_t, int64_t>{"off_da", off_da, r * K},
                                {"off_db", off_db, N * r},
                                {"off_dbias", off_dbias, N}}) {
    if (off < -1 || (off >= 0 && off + len > grad_flat_len))
      bad(call, std::string(name) + " must be -1 (not wanted) or an offset with room for " + str(len) +
                    " floats in grad_flat (grad_flat_len " + str(grad_flat_len) + "), got " + str(off));
  }
  const bool need_grads = off_da >= 0 || off_db >= 0 || off_dbias >= 0;
  lora::check_pointer(call, "grad_y", ptr(grad_y), ea, M == 0);
  lora::check_pointer(call, "x", ptr(x), ea, M == 0 || off_da < 0);  // only dA reads x
  lora::check_pointer(call, "weight", ptr(weight), ea, false);
  lora::check_pointer(call, "lora_a", ptr(lora_a), ed, false);
  lora::check_pointer(call, "lora_b", ptr(lora_b), ed, false);
  lora::check_pointer(call, "xa", ptr(xa), 4, M == 0 || off_db < 0);  // only dB reads xa
  lora::check_pointer(call, "grad_x", ptr(grad_x), ea, true);         // null: x needs no grad
  lora::check_pointer(call, "grad_flat", ptr(grad_flat), 4, !need_grads);
  if (M > 0)
    check_workspace(call, workspace, workspace_bytes, lora::plan::bwd_workspace_bytes(M, N, K, r),
                    "bwd_workspace_bytes");

  lora::plan::BwdArgs p{};
  p.g = ptr(grad_y), p.x = ptr(x), p.w = ptr(weight), p.a = ptr(lora_a), p.b = ptr(lora_b);
  p.xa = static_cast<const float*>(ptr(xa)), p.dx = mut(grad_x), p.flat = static_cast<float*>(mut(grad_flat));
  p.off_da = off_da, p.off_db = off_db, p.off_dbias = off_dbias, p.ws = mut(workspace), p.ws_bytes = workspace_bytes;
  p.M = M, p.N = N, p.K = K, p.r = r, p.ldg = stride_g_m, p.ldx = stride_x_m;
  p.act_dtype = act_dtype, p.adapter_dtype = adapter_dtype, p.scale = static_cast<float>(scale);
  p.drop = dropout_params(call, dropout, seed, offset, threshold, inv_keep);

  const lora::DeviceGuard guard(call, device);
  on_device(call, device,
            {{"grad_y", grad_y},
             {"x", x},
             {"weight", weight},
             {"lora_a", lora_a},
             {"lora_b", lora_b},
             {"xa", xa},
             {"grad_x", grad_x},
             {"grad_flat", grad_flat},
             {"workspace", workspace}});
  lora::plan::run_bwd(call, p, mut(stream));
}

py::dict split_info(int64_t M, int64_t N, int64_t K, int64_t r) {
  const char* call = "lora_kernels._C_cublas.split_info";
  check_sizes(call, M, N, K, r);
  const lora::plan::Split f = lora::plan::rank_reduce_split(M, K, r), b = lora::plan::bwd_split(M, N, K, r);
  return py::dict(py::arg("rp") = f.rp, py::arg("fwd_ksplit") = f.ksplit, py::arg("bwd_ksplit") = b.ksplit,
                  py::arg("msplit") = b.msplit, py::arg("rows_per_split") = b.rows_per_split);
}

}  // namespace

PYBIND11_MODULE(_C_cublas, mod) {
  mod.doc() = "lora_kernels plan 'cublas': cuBLASLt GEMMs + rank-r kernels, one call per direction (torch-free)";
  mod.attr("MAX_RANK") = lora::plan::kMaxRank;
  mod.attr("LT_WORKSPACE_BYTES") = lora::plan::kLtWorkspaceBytes;
  mod.def("fwd", &fwd, py::kw_only(), py::arg("x"), py::arg("stride_x_m"), py::arg("weight"), py::arg("bias"),
          py::arg("lora_a"), py::arg("lora_b"), py::arg("y"), py::arg("xa"), py::arg("workspace"),
          py::arg("workspace_bytes"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("r"), py::arg("act_dtype"),
          py::arg("adapter_dtype"), py::arg("scale"), py::arg("dropout"), py::arg("seed"), py::arg("offset"),
          py::arg("threshold"), py::arg("inv_keep"), py::arg("device"), py::arg("stream"),
          "Forward, 3 launches: xa = (x ⊙ Z) Aᵀ (fp32), y = x Wᵀ + bias + scale · xa Bᵀ. Asynchronous on `stream`.");
  mod.def("bwd", &bwd, py::kw_only(), py::arg("grad_y"), py::arg("stride_g_m"), py::arg("x"), py::arg("stride_x_m"),
          py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("xa"), py::arg("grad_x"),
          py::arg("grad_flat"), py::arg("grad_flat_len"), py::arg("off_da"), py::arg("off_db"), py::arg("off_dbias"),
          py::arg("workspace"), py::arg("workspace_bytes"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("r"),
          py::arg("act_dtype"), py::arg("adapter_dtype"), py::arg("scale"), py::arg("dropout"), py::arg("seed"),
          py::arg("offset"), py::arg("threshold"), py::arg("inv_keep"), py::arg("device"), py::arg("stream"),
          "Backward, up to 5 launches, no atomics: grad_x (optional) and dA / dB / db (fp32, written at their "
          "offsets of grad_flat; -1 = not wanted). Asynchronous on `stream`.");
  mod.def("fwd_workspace_bytes", &lora::plan::fwd_workspace_bytes, py::arg("M"), py::arg("N"), py::arg("K"),
          py::arg("r"), "Bytes of workspace fwd needs (256-byte aligned base).");
  mod.def("bwd_workspace_bytes", &lora::plan::bwd_workspace_bytes, py::arg("M"), py::arg("N"), py::arg("K"),
          py::arg("r"), "Bytes of workspace bwd needs (256-byte aligned base).");
  mod.def("fwd_launches", &lora::plan::fwd_launches, py::arg("M"),
          "Launches of one fwd call: our kernels plus one cuBLASLt matmul (which may itself launch more than one).");
  mod.def("bwd_launches", &lora::plan::bwd_launches, py::arg("M"), py::arg("need_dx"), py::arg("need_da"),
          py::arg("need_db"), py::arg("need_dbias"), "Launches of one bwd call (as fwd_launches).");
  mod.def("split_info", &split_info, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("r"),
          "How a call is cut up (a function of the sizes only): rp, fwd_ksplit, bwd_ksplit, msplit, rows_per_split.");
  mod.def("cublaslt_info", &lora::lt::version_info, "The cuBLASLt library loaded and the header built against.");
  mod.def("cached_plans", &lora::lt::cached_plans, "cuBLASLt matmul plans cached by this process.");
  mod.def("runtime_info", &lora::runtime_info, "CUDA runtime version and target architectures of this build.");
}
