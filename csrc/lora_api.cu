// Boundary checks and CUDA plumbing for the binding. Every failure names the call and the argument.
#include <cuda_runtime.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "lora_api.h"

namespace lora {

static std::string cuda_msg(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

DeviceGuard::DeviceGuard(const char* call, int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    throw std::runtime_error(std::string(call) + ": no usable CUDA device (cudaGetDeviceCount: " +
                             (err != cudaSuccess ? cuda_msg(err) : std::string("0 devices")) + ")");
  }
  if (device < 0 || device >= count)
    throw std::invalid_argument(std::string(call) + ": device must be in [0, " + std::to_string(count) + "), got " +
                                std::to_string(device));
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device) {
    const cudaError_t e2 = cudaSetDevice(device);
    if (e2 != cudaSuccess)
      throw std::runtime_error(std::string(call) + ": cudaSetDevice(" + std::to_string(device) +
                               ") failed: " + cuda_msg(e2));
    previous_ = current;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

void check_pointer(const char* call, const char* name, const void* ptr, int64_t elem_bytes, bool nullable) {
  const auto addr = reinterpret_cast<uintptr_t>(ptr);
  if (addr == 0) {
    if (nullable) return;
    throw std::invalid_argument(std::string(call) + ": " + name + " must be a non-null device pointer");
  }
  if (addr % static_cast<uintptr_t>(elem_bytes) != 0)
    throw std::invalid_argument(std::string(call) + ": " + name + " (0x" +
                                [&] {
                                  char buf[32];
                                  snprintf(buf, sizeof(buf), "%llx", static_cast<unsigned long long>(addr));
                                  return std::string(buf);
                                }() +
                                ") must be aligned to its element size (" + std::to_string(elem_bytes) + " bytes)");
}

void check_on_device(const char* call, const char* name, const void* ptr, int device) {
  if (ptr == nullptr) return;
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::invalid_argument(std::string(call) + ": " + name + " is not a CUDA pointer (" + cuda_msg(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string(call) + ": " + name +
                                " must point to device memory (got host or unregistered memory)");
  if (attr.device != device)
    throw std::invalid_argument(std::string(call) + ": " + name + " lives on device " + std::to_string(attr.device) +
                                ", expected device " + std::to_string(device));
}

void check_last_error(const char* call) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(call) + ": CUDA error " + cuda_msg(err));
}

int64_t dtype_bytes(const char* call, const char* name, int code) {
  switch (code) {
    case kFloat32:
      return 4;
    case kFloat16:
    case kBFloat16:
      return 2;
    default:
      throw std::invalid_argument(std::string(call) + ": " + name +
                                  " must be a dtype code 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                  std::to_string(code));
  }
}

void set_smem_limit(const char* call, const void* kernel, size_t bytes) {
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (bytes > static_cast<size_t>(optin))
    throw std::invalid_argument(std::string(call) + ": needs " + std::to_string(bytes) +
                                " bytes of shared memory per block for this rank and dtype; the device allows " +
                                std::to_string(optin) + " (use a smaller rank r)");
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) throw std::runtime_error(std::string(call) + ": cudaFuncSetAttribute: " + cuda_msg(err));
}

KernelPolicy kernel_policy() {
  const char* env = std::getenv("LORA_KERNELS_CUDA_KERNEL");
  if (env == nullptr || *env == '\0') return kDefaultKernelPolicy;
  const std::string v(env);
  if (v == "simple") return KernelPolicy::kSimple;
  if (v == "pipelined") return KernelPolicy::kPipelined;
  throw std::invalid_argument("LORA_KERNELS_CUDA_KERNEL must be 'simple' or 'pipelined', got '" + v + "'");
}

int pipe_bk() {
  const char* env = std::getenv("LORA_KERNELS_CUDA_BK");
  if (env == nullptr || *env == '\0') return 32;
  const std::string v(env);
  if (v == "32") return 32;
  if (v == "64") return 64;
  throw std::invalid_argument("LORA_KERNELS_CUDA_BK must be 32 or 64, got '" + v + "'");
}

size_t device_smem_optin() {
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return static_cast<size_t>(optin);
}

static std::string g_last_path[2] = {"none", "none"};  // calls come from Python under the GIL

void record_path(int which, const char* path) { g_last_path[which] = path; }
std::string last_path(int which) { return g_last_path[which]; }

std::string runtime_info() {
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  return "cudart " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10) + " (static), built for " +
         LORA_KERNELS_CUDA_ARCHS;
}

}  // namespace lora
