// lora_kernels._C: the torch-free pybind11 boundary of the CUDA kernels.
//
// Every tensor arrives as a raw device address (int), with sizes, element strides, a dtype code
// (0 float32, 1 float16, 2 bfloat16), the device index and the cudaStream_t as an int. Everything is validated
// here, before any CUDA call, with messages naming the argument (ValueError); CUDA failures, including "no
// device", become RuntimeError prefixed with the call's name. The kernels themselves assume valid input.
// Importing this module touches no CUDA API, so it works on machines without a GPU or driver.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "lora_api.h"

namespace py = pybind11;
using lora::check_pointer;

namespace {

[[noreturn]] void bad(const char* call, const std::string& msg) {
  throw std::invalid_argument(std::string(call) + ": " + msg);
}

void check_sizes(const char* call, int64_t M, int64_t N, int64_t K, int64_t r) {
  if (M < 0) bad(call, "M (rows of x) must be >= 0, got " + std::to_string(M));
  if (N < 1) bad(call, "N (out_features) must be >= 1, got " + std::to_string(N));
  if (K < 1) bad(call, "K (in_features) must be >= 1, got " + std::to_string(K));
  if (r < 1 || r > lora::kMaxRank)
    bad(call, "r (LoRA rank) must be in [1, " + std::to_string(lora::kMaxRank) + "], got " + std::to_string(r));
  // grid.y is limited to 65535 blocks of 128 columns; grid.x (M tiles of 64) to 2^31 - 1
  if ((N + 127) / 128 > 65535) bad(call, "N (out_features) too large for the grid: " + std::to_string(N));
  if ((K + 127) / 128 > 65535) bad(call, "K (in_features) too large for the grid: " + std::to_string(K));
  if ((M + 63) / 64 > INT32_MAX) bad(call, "M (rows of x) too large for the grid: " + std::to_string(M));
}

void check_stride(const char* call, const char* name, int64_t s) {
  if (s < 0)
    bad(call, std::string(name) + " must be >= 0 (negative strides are not supported), got " + std::to_string(s));
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

const void* ptr(uint64_t v) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(v)); }

void lora_fwd(uint64_t x, int64_t stride_x_m, int64_t stride_x_k, uint64_t weight, uint64_t bias, uint64_t lora_a,
              uint64_t lora_b, uint64_t y, uint64_t xa, int64_t M, int64_t N, int64_t K, int64_t r, int act_dtype,
              int adapter_dtype, double scale, bool dropout, uint64_t seed, uint64_t offset, uint64_t threshold,
              double inv_keep, int device, uint64_t stream) {
  const char* call = "lora_kernels._C.lora_fwd";
  check_sizes(call, M, N, K, r);
  check_dtypes(call, act_dtype, adapter_dtype);
  check_stride(call, "stride_x_m", stride_x_m);
  check_stride(call, "stride_x_k", stride_x_k);
  if (!std::isfinite(scale)) bad(call, "scale must be finite, got " + std::to_string(scale));
  const int64_t ea = lora::dtype_bytes(call, "act_dtype", act_dtype);
  const int64_t ed = lora::dtype_bytes(call, "adapter_dtype", adapter_dtype);
  check_pointer(call, "x", ptr(x), ea, M == 0);  // empty tensors may have no storage
  check_pointer(call, "weight", ptr(weight), ea, false);
  check_pointer(call, "bias", ptr(bias), ea, true);
  check_pointer(call, "lora_a", ptr(lora_a), ed, false);
  check_pointer(call, "lora_b", ptr(lora_b), ed, false);
  check_pointer(call, "y", ptr(y), ea, M == 0);   // empty tensors may have no storage
  check_pointer(call, "xa", ptr(xa), 4, M == 0);  // empty tensors may have no storage

  lora::FwdParams p{};
  p.x = ptr(x), p.w = ptr(weight), p.bias = ptr(bias), p.a = ptr(lora_a), p.b = ptr(lora_b);
  p.y = const_cast<void*>(ptr(y)), p.xa = static_cast<float*>(const_cast<void*>(ptr(xa)));
  p.M = M, p.N = N, p.K = K, p.r = r, p.stride_x_m = stride_x_m, p.stride_x_k = stride_x_k;
  p.act_dtype = act_dtype, p.adapter_dtype = adapter_dtype, p.scale = static_cast<float>(scale);
  p.drop = dropout_params(call, dropout, seed, offset, threshold, inv_keep);

  const lora::DeviceGuard guard(call, device);
  for (auto [name, v] : {std::pair<const char*, uint64_t>{"x", x},
                         {"weight", weight},
                         {"bias", bias},
                         {"lora_a", lora_a},
                         {"lora_b", lora_b},
                         {"y", y},
                         {"xa", xa}})
    lora::check_on_device(call, name, ptr(v), device);
  lora::launch_fwd(p, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
}

void lora_bwd(uint64_t grad_y, int64_t stride_g_m, int64_t stride_g_n, uint64_t x, int64_t stride_x_m,
              int64_t stride_x_k, uint64_t weight, uint64_t lora_a, uint64_t lora_b, uint64_t xa, uint64_t grad_x,
              uint64_t grad_a, uint64_t grad_b, uint64_t grad_bias, uint64_t workspace, int64_t workspace_bytes,
              int64_t M, int64_t N, int64_t K, int64_t r, int act_dtype, int adapter_dtype, double scale, bool dropout,
              uint64_t seed, uint64_t offset, uint64_t threshold, double inv_keep, bool deterministic, int device,
              uint64_t stream) {
  const char* call = "lora_kernels._C.lora_bwd";
  check_sizes(call, M, N, K, r);
  check_dtypes(call, act_dtype, adapter_dtype);
  check_stride(call, "stride_g_m", stride_g_m);
  check_stride(call, "stride_g_n", stride_g_n);
  check_stride(call, "stride_x_m", stride_x_m);
  check_stride(call, "stride_x_k", stride_x_k);
  if (!std::isfinite(scale)) bad(call, "scale must be finite, got " + std::to_string(scale));
  const int64_t ea = lora::dtype_bytes(call, "act_dtype", act_dtype);
  const int64_t ed = lora::dtype_bytes(call, "adapter_dtype", adapter_dtype);
  check_pointer(call, "grad_y", ptr(grad_y), ea, M == 0);  // empty tensors may have no storage
  check_pointer(call, "x", ptr(x), ea, M == 0);            // empty tensors may have no storage
  check_pointer(call, "weight", ptr(weight), ea, false);
  check_pointer(call, "lora_a", ptr(lora_a), ed, false);
  check_pointer(call, "lora_b", ptr(lora_b), ed, false);
  check_pointer(call, "xa", ptr(xa), 4, M == 0);  // empty tensors may have no storage
  check_pointer(call, "grad_x", ptr(grad_x), ea, true);
  check_pointer(call, "grad_a", ptr(grad_a), ed, false);
  check_pointer(call, "grad_b", ptr(grad_b), ed, false);
  check_pointer(call, "grad_bias", ptr(grad_bias), ea, true);
  const int64_t need = lora::bwd_workspace_bytes(M, N, K, r, deterministic);
  check_pointer(call, "workspace", ptr(workspace), 16, need == 0);
  if (workspace_bytes < need)
    bad(call, "workspace_bytes must be >= bwd_workspace_bytes(M, N, K, r, deterministic) = " + std::to_string(need) +
                  ", got " + std::to_string(workspace_bytes));

  lora::BwdParams p{};
  p.g = ptr(grad_y), p.x = ptr(x), p.w = ptr(weight), p.a = ptr(lora_a), p.b = ptr(lora_b);
  p.xa = static_cast<const float*>(ptr(xa));
  p.dx = const_cast<void*>(ptr(grad_x)), p.da = const_cast<void*>(ptr(grad_a)), p.db = const_cast<void*>(ptr(grad_b));
  p.dbias = const_cast<void*>(ptr(grad_bias)), p.ws = const_cast<void*>(ptr(workspace));
  p.M = M, p.N = N, p.K = K, p.r = r;
  p.stride_g_m = stride_g_m, p.stride_g_n = stride_g_n, p.stride_x_m = stride_x_m, p.stride_x_k = stride_x_k;
  p.act_dtype = act_dtype, p.adapter_dtype = adapter_dtype, p.scale = static_cast<float>(scale);
  p.drop = dropout_params(call, dropout, seed, offset, threshold, inv_keep);
  p.deterministic = deterministic;

  const lora::DeviceGuard guard(call, device);
  for (auto [name, v] : {std::pair<const char*, uint64_t>{"grad_y", grad_y},
                         {"x", x},
                         {"weight", weight},
                         {"lora_a", lora_a},
                         {"lora_b", lora_b},
                         {"xa", xa},
                         {"grad_x", grad_x},
                         {"grad_a", grad_a},
                         {"grad_b", grad_b},
                         {"grad_bias", grad_bias},
                         {"workspace", workspace}})
    lora::check_on_device(call, name, ptr(v), device);
  lora::launch_bwd(p, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
}

// Host copy of the device dropout hash (same header), for CPU tests of the mirror: bytes of 0/1, row-major [M, K].
py::bytes dropout_keep_mask_host(uint64_t seed, uint64_t offset, int64_t M, int64_t K, uint64_t threshold) {
  const char* call = "lora_kernels._C.dropout_keep_mask_host";
  if (M < 0 || K < 0 || M * K > (int64_t(1) << 28)) bad(call, "M, K must be >= 0 with M*K <= 2**28");
  const lora::DropoutParams d = dropout_params(call, true, seed, offset, threshold, 1.0);
  std::string out(static_cast<size_t>(M * K), '\0');
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = lora::dropout_keep(d, m, k, K) ? 1 : 0;
  return py::bytes(out);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "lora_kernels CUDA kernels (torch-free binding: raw device pointers, sizes, strides, dtype codes)";
  mod.attr("MAX_RANK") = lora::kMaxRank;
  mod.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("float16") = 1, py::arg("bfloat16") = 2);
  mod.def("lora_fwd", &lora_fwd, py::kw_only(), py::arg("x"), py::arg("stride_x_m"), py::arg("stride_x_k"),
          py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("y"), py::arg("xa"),
          py::arg("M"), py::arg("N"), py::arg("K"), py::arg("r"), py::arg("act_dtype"), py::arg("adapter_dtype"),
          py::arg("scale"), py::arg("dropout"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
          py::arg("inv_keep"), py::arg("device"), py::arg("stream"),
          "Forward, one launch: y = x Wᵀ + bias + scale · xa Bᵀ and xa = (x ⊙ Z) Aᵀ (fp32). Asynchronous on `stream`.");
  mod.def("lora_bwd", &lora_bwd, py::kw_only(), py::arg("grad_y"), py::arg("stride_g_m"), py::arg("stride_g_n"),
          py::arg("x"), py::arg("stride_x_m"), py::arg("stride_x_k"), py::arg("weight"), py::arg("lora_a"),
          py::arg("lora_b"), py::arg("xa"), py::arg("grad_x"), py::arg("grad_a"), py::arg("grad_b"),
          py::arg("grad_bias"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("M"), py::arg("N"),
          py::arg("K"), py::arg("r"), py::arg("act_dtype"), py::arg("adapter_dtype"), py::arg("scale"),
          py::arg("dropout"), py::arg("seed"), py::arg("offset"), py::arg("threshold"), py::arg("inv_keep"),
          py::arg("deterministic"), py::arg("device"), py::arg("stream"),
          "Backward: grad_x (optional), grad_a, grad_b, grad_bias (optional). One launch with fp32 atomics, or two "
          "launches without atomics when deterministic. Asynchronous on `stream`.");
  mod.def("bwd_workspace_bytes", &lora::bwd_workspace_bytes, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("r"),
          py::arg("deterministic"), "Bytes of fp32 workspace lora_bwd needs for these sizes and mode.");
  mod.def("dropout_keep_mask_host", &dropout_keep_mask_host, py::arg("seed"), py::arg("offset"), py::arg("M"),
          py::arg("K"), py::arg("threshold"),
          "Host evaluation of the kernels' dropout hash (csrc/lora_rng.cuh): M*K bytes, 1 = kept.");
  mod.def(
      "last_path", [] { return py::dict(py::arg("fwd") = lora::last_path(0), py::arg("bwd") = lora::last_path(1)); },
      "Main loop the last lora_fwd / lora_bwd call of this process took: 'pipelined' or 'simple (<reason>)' "
      "('none' before the first call). The policy comes from LORA_KERNELS_CUDA_KERNEL=simple|pipelined.");
  mod.attr("DEFAULT_KERNEL") = lora::kDefaultKernelPolicy == lora::KernelPolicy::kPipelined ? "pipelined" : "simple";
  mod.def("runtime_info", &lora::runtime_info, "CUDA runtime version and target architectures of this build.");
}
