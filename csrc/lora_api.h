// Host-side interface between the pybind11 binding (binding.cpp, compiled by the host compiler) and the CUDA
// translation units (lora_fwd.cu, lora_bwd.cu, lora_api.cu). Plain C++: no pybind11, no libtorch.
//
// Every pointer is a raw device address, every size and stride an element count. The binding validates them
// (lora_api.cu: validate_*), the launchers assume valid input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "lora_rng.cuh"

namespace lora {

// dtype codes shared with lora_kernels/backends/cuda/backend.py (_DTYPE_CODES)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxRank = 256;

struct FwdParams {
  // pointers
  const void* x;     // [M, K] activations, strides (stride_x_m, stride_x_k)
  const void* w;     // [N, K] base weight, contiguous, activation dtype
  const void* bias;  // [N] or nullptr, activation dtype
  const void* a;     // [r, K] lora_A, contiguous, adapter dtype
  const void* b;     // [N, r] lora_B, contiguous, adapter dtype
  void* y;           // [M, N] out, contiguous, activation dtype
  float* xa;         // [M, r] out, contiguous, fp32 (saved for backward)
  // sizes
  int64_t M, N, K, r;
  // strides (elements)
  int64_t stride_x_m, stride_x_k;
  // meta
  int act_dtype, adapter_dtype;
  float scale;
  DropoutParams drop;
};

struct BwdParams {
  // pointers
  const void* g;    // [M, N] grad of y, strides (stride_g_m, stride_g_n), activation dtype
  const void* x;    // [M, K] saved input, strides (stride_x_m, stride_x_k)
  const void* w;    // [N, K] base weight, contiguous
  const void* a;    // [r, K] lora_A
  const void* b;    // [N, r] lora_B
  const float* xa;  // [M, r] fp32, from the forward
  void* dx;         // [M, K] out (activation dtype) or nullptr when x needs no grad
  void* da;         // [r, K] out (adapter dtype)
  void* db;         // [N, r] out (adapter dtype)  (grad of lora_B)
  void* dbias;      // [N] out (activation dtype) or nullptr
  void* ws;         // fp32 workspace of bwd_workspace_bytes(...) bytes
  // sizes
  int64_t M, N, K, r;
  // strides (elements)
  int64_t stride_g_m, stride_g_n, stride_x_m, stride_x_k;
  // meta
  int act_dtype, adapter_dtype;
  float scale;
  DropoutParams drop;
  bool deterministic;
};

// Launchers (lora_fwd.cu / lora_bwd.cu): enqueue on `stream`, return without synchronising.
void launch_fwd(const FwdParams& p, void* stream);
void launch_bwd(const BwdParams& p, void* stream);
int64_t bwd_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t r, bool deterministic);

// Boundary checks and CUDA plumbing (lora_api.cu). Each throws std::invalid_argument (bad argument, named) or
// std::runtime_error (CUDA error, prefixed with the call's name).
// Makes `device` current for the launch and restores the previous device afterwards (the driver's current
// context is shared with torch's runtime: leaving it switched would move torch's later calls to our device).
// Throws std::runtime_error naming the call when no usable device exists (the no-GPU error path).
class DeviceGuard {
 public:
  DeviceGuard(const char* call, int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};
void check_pointer(const char* call, const char* name, const void* ptr, int64_t elem_bytes, bool nullable);
void check_on_device(const char* call, const char* name, const void* ptr, int device);
void check_last_error(const char* call);
int64_t dtype_bytes(const char* call, const char* name, int code);
// Raise the kernel's dynamic shared memory limit to `bytes` (checked against the device's opt-in maximum).
void set_smem_limit(const char* call, const void* kernel, size_t bytes);
std::string runtime_info();

// Main-loop policy of the fp16/bf16 kernels. kPipelined: cp.async ring + mma.sync (lora_pipe.cuh), taken when the
// call qualifies (fp16/bf16, r <= 64, 16-byte aligned rows), else the simple kernels with the reason recorded.
// kSimple: the WMMA kernels with synchronous tile loads (verified on H200, GPU run 1) for every call.
// The environment variable LORA_KERNELS_CUDA_KERNEL=simple|pipelined overrides the default, read at each call.
enum class KernelPolicy { kSimple, kPipelined };
constexpr KernelPolicy kDefaultKernelPolicy = KernelPolicy::kPipelined;  // fall back: KernelPolicy::kSimple
KernelPolicy kernel_policy();
// The path the last forward (which = 0) / backward (which = 1) call of this process took, e.g. "pipelined" or
// "simple (r > 64)" (the binding's last_path()).
void record_path(int which, const char* path);
// Reduction step of the pipelined loop: LORA_KERNELS_CUDA_BK=32|64 (default 32), read at each call.
int pipe_bk();
// The current device's opt-in shared memory limit per block (bytes).
size_t device_smem_optin();
std::string last_path(int which);

}  // namespace lora
