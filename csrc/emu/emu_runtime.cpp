// Host stand-ins for the CUDA runtime calls of lora_api.cu under the CPU emulation (lora_emu.h): one device (0),
// every pointer "device memory" on it, 227 KB of opt-in shared memory (sm_90). Never linked into a real build.
#include <cuda_runtime_api.h>

extern "C" {

cudaError_t CUDARTAPI cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaSetDevice(int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
const char* CUDARTAPI cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { return "emulated CUDA runtime"; }
cudaError_t CUDARTAPI cudaPointerGetAttributes(struct cudaPointerAttributes* attr, const void* ptr) {
  attr->type = cudaMemoryTypeDevice;
  attr->device = 0;
  attr->devicePointer = const_cast<void*>(ptr);
  attr->hostPointer = nullptr;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr, int) {
  *value = 227 * 1024;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}

}  // extern "C"
