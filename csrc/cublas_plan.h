// Plan "cublas" of the CUDA backend (lora_kernels._C_cublas): the two big GEMMs by cuBLASLt, the rank-r and
// dropout work in the kernels of cublas_plan.cu, every launch of one direction issued by one C++ call.
//
// Host-side interface between the binding (binding_cublas.cpp) and the CUDA translation unit. Plain C++: no
// pybind11, no libtorch. Pointers are raw device addresses, sizes and strides element counts; the binding
// validates them, the launchers assume valid input.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lora_rng.cuh"

namespace lora::plan {

constexpr int kMaxRank = 64;     // RP = r rounded up to 16 <= 64: the accumulators of the kernels
constexpr int kRowBlock = 64;    // rows per tile in every kernel
constexpr int kColTile = 128;    // columns per tile of the lowrank_add / dB kernels
constexpr int kReduceStep = 64;  // reduction step (columns) of the rank-reduce kernel
constexpr int kMaxSplits = 8;    // M-splits of the dA / dB / db reductions (deterministic partial sums)
constexpr int64_t kLtWorkspaceBytes = int64_t(32) << 20;  // cuBLASLt workspace (torch's size on sm_90)

// How one call is cut up; a pure function of the sizes (never of the device), so that the same shapes give the
// same bits on every run (the reductions are fixed-order sums over these splits).
struct Split {
  int64_t rp;              // r rounded up to 16
  int64_t ksplit;          // column splits of the rank-reduce kernel (XA, GB partial sums)
  int64_t cols_per_split;  // multiple of kReduceStep
  int64_t msplit;          // row splits of the dA / dB / db reductions
  int64_t rows_per_split;  // multiple of kRowBlock
};
Split rank_reduce_split(int64_t rows, int64_t cols, int64_t r);  // ksplit / cols_per_split for [rows, cols]
Split bwd_split(int64_t M, int64_t N, int64_t K, int64_t r);     // all of them for the backward

struct FwdArgs {
  const void* x;     // [M, K] activations, row stride ldx, unit inner stride
  const void* w;     // [N, K] base weight, contiguous, activation dtype
  const void* bias;  // [N] or nullptr, activation dtype
  const void* a;     // [r, K] lora_A, contiguous, adapter dtype
  const void* b;     // [N, r] lora_B, contiguous, adapter dtype
  void* y;           // [M, N] out, contiguous, activation dtype
  float* xa;         // [M, r] out, contiguous, fp32 (saved for backward)
  void* ws;          // fwd_workspace_bytes(...) bytes, 256-byte aligned
  int64_t ws_bytes;
  int64_t M, N, K, r, ldx;
  int act_dtype, adapter_dtype;
  float scale;
  DropoutParams drop;
};

struct BwdArgs {
  const void* g;    // [M, N] grad of y, row stride ldg, unit inner stride, activation dtype
  const void* x;    // [M, K] saved input, row stride ldx, unit inner stride
  const void* w;    // [N, K] base weight, contiguous
  const void* a;    // [r, K] lora_A
  const void* b;    // [N, r] lora_B
  const float* xa;  // [M, r] fp32, from the forward
  void* dx;         // [M, K] out (activation dtype, contiguous) or nullptr when x needs no grad
  float* flat;      // the op contract's flat fp32 gradient buffer (lora_kernels.backends.opdef.grad_layout)
  int64_t off_da, off_db, off_dbias;  // offsets into flat, -1 = not wanted
  void* ws;                           // bwd_workspace_bytes(...) bytes, 256-byte aligned
  int64_t ws_bytes;
  int64_t M, N, K, r, ldg, ldx;
  int act_dtype, adapter_dtype;
  float scale;
  DropoutParams drop;
};

int64_t fwd_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t r);
int64_t bwd_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t r);
// Kernel launches (ours + cuBLASLt GEMMs) one call makes: what the GPU tests count with the profiler.
int fwd_launches(int64_t M);
int bwd_launches(int64_t M, bool need_dx, bool need_da, bool need_db, bool need_dbias);

// Enqueue everything on `stream` and return: no host synchronisation, no allocation (all scratch is carved out of
// the caller's workspace), so both are CUDA-graph capturable once the cuBLASLt handle and plans exist (first call).
void run_fwd(const char* call, const FwdArgs& p, void* stream);
void run_bwd(const char* call, const BwdArgs& p, void* stream);

}  // namespace lora::plan
