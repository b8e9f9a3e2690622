// A CPU emulation of the CUDA execution model, for testing plan "cublas" (csrc/cublas_plan.cu) on machines without a
// GPU: tests/test_cuda_cublas_emu.py compiles cublas_plan.cu, binding_cublas.cpp and lora_api.cu as host C++ with
// -DLORA_EMULATE (and emu/lt_gemm_emu.cpp in place of cuBLASLt) into a module that takes host pointers.
//
// A launch runs the grid's CTAs one after another; each CTA is blockDim.x std::threads sharing one dynamic shared
// memory buffer, __syncthreads() is a std::barrier over them (a divergent barrier deadlocks: the test's timeout
// reports it). Warp MMAs run the lane-per-row SIMT scheme of the fp32 path for every dtype (TileMma in
// cublas_plan.cu), so the emulation checks the kernels' index arithmetic, tails, masks, splits and reductions, and
// the host orchestration (workspace carving, GEMM operand mapping) -- not the WMMA fragments, not timing, not races.
#pragma once

#ifdef LORA_EMULATE

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#undef __host__
#undef __device__
#undef __global__
#undef __forceinline__
#undef __launch_bounds__
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
using std::fmaf;

namespace lora_emu {

inline thread_local uint3 t_thread, t_block;
inline thread_local dim3 t_block_dim, t_grid_dim;
inline thread_local unsigned char* t_smem = nullptr;
inline thread_local std::barrier<>* t_barrier = nullptr;

inline void sync() { t_barrier->arrive_and_wait(); }

inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        // fresh, poisoned shared memory per CTA: a read before the CTA wrote it shows up as NaN / garbage
        std::vector<unsigned char> smem(smem_bytes + 128, 0xFF);
        auto* base =
            reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 127) & ~uintptr_t(127));
        std::barrier<> bar(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            t_thread = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            t_block = uint3{bx, by, bz};
            t_block_dim = block;
            t_grid_dim = grid;
            t_smem = base;
            t_barrier = &bar;
            body();
          });
        for (auto& th : pool) th.join();
      }
}

}  // namespace lora_emu

#define threadIdx (::lora_emu::t_thread)
#define blockIdx (::lora_emu::t_block)
#define blockDim (::lora_emu::t_block_dim)
#define gridDim (::lora_emu::t_grid_dim)
#define __syncthreads() ::lora_emu::sync()
#define LORA_DYNAMIC_SMEM(name) unsigned char* name = ::lora_emu::t_smem
#define LORA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::lora_emu::launch((grid), (block), (smem), [=] { kernel(__VA_ARGS__); })

#else  // the real thing

#define LORA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define LORA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)

#endif
