// lora_kernels._cpu: the fused dropout pass of the torch backend on CPU (hash + select + scale, one pass), the 4-bit
// dequant of QLoRA and the fused decoder-block ops (RMSNorm, SiLU-mul; block_kernels.h), as a torch-free pybind11
// module like lora_kernels._C: tensors arrive as raw addresses (int) with sizes, element
// strides and a dtype code (0 float32, 1 float16, 2 bfloat16, 3 float64). Arguments are validated here with
// messages naming them (ValueError); the row kernels (dropout_kernels.h) assume valid input.
//
// Rows are split over `nthreads` OpenMP threads. Linked after torch, the module shares torch's OpenMP runtime
// (its libgomp.so.1 is already loaded under that soname), so no second thread pool competes for the cores. The hot
// loops are compiled for x86-64-v4 (AVX-512), -v3 (AVX2) and baseline, picked at load time (target_clones).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "block_kernels.h"
#include "dequant_kernels.h"
#include "dropout_kernels.h"

namespace py = pybind11;
using namespace lora_cpu;

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(LK_NO_CLONES)
#define LK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define LK_CLONE_LIST "x86-64-v4,x86-64-v3,default"
#else
#define LK_CLONES
#define LK_CLONE_LIST "default"
#endif

namespace {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Below this many elements one thread does the pass: waking the team costs more than it saves.
constexpr int64_t kParallelMinElems = int64_t(1) << 15;

struct Args {
  const void* x;
  int64_t sxm, sxk;
  void* xd;  // output of the dropped x (acc dtype: fp32, or fp64 for fp64), or nullptr
  int64_t som;
  const void* t;  // backward: (G B) A in the activation dtype, or nullptr
  int64_t stm;
  void* dx;  // backward: updated in place, or nullptr
  int64_t sdm;
  int64_t K;
  Hash hs;
  double scale, alpha;
};

template <class In, class Out, bool Contig>
LK_INLINE void bwd_dispatch(const Args& a, int64_t m0, int64_t m1) {
  using T = typename In::T;
  using O = typename Out::T;
  using Op = typename In::Op;
  const auto* x = static_cast<const T*>(a.x);
  const auto* t = static_cast<const T*>(a.t);
  auto* dx = static_cast<T*>(a.dx);
  auto* xd = static_cast<O*>(a.xd);
  const Op s = static_cast<Op>(a.scale), al = static_cast<Op>(a.alpha);
  if (dx && xd)
    backward_rows<In, Out, Contig, true, true>(x, a.sxm, a.sxk, xd, a.som, t, a.stm, dx, a.sdm, m0, m1, a.K, a.hs, s,
                                               al);
  else if (dx)
    backward_rows<In, Out, Contig, true, false>(x, a.sxm, a.sxk, xd, a.som, t, a.stm, dx, a.sdm, m0, m1, a.K, a.hs, s,
                                                al);
  else
    backward_rows<In, Out, Contig, false, true>(x, a.sxm, a.sxk, xd, a.som, t, a.stm, dx, a.sdm, m0, m1, a.K, a.hs, s,
                                                al);
}

// One cloned entry point per activation dtype: forward (t == dx == nullptr) or backward.
#define LK_DEFINE_ROWS(NAME, IN, OUT)                                                                          \
  LK_CLONES void NAME(const Args& a, int64_t m0, int64_t m1, bool backward) {                                  \
    const bool contig = a.sxk == 1;                                                                            \
    if (!backward) {                                                                                           \
      using Op = typename IN::Op;                                                                              \
      const auto* x = static_cast<const typename IN::T*>(a.x);                                                 \
      auto* xd = static_cast<typename OUT::T*>(a.xd);                                                          \
      if (contig)                                                                                              \
        forward_rows<IN, OUT, true>(x, a.sxm, a.sxk, xd, a.som, m0, m1, a.K, a.hs, static_cast<Op>(a.scale));  \
      else                                                                                                     \
        forward_rows<IN, OUT, false>(x, a.sxm, a.sxk, xd, a.som, m0, m1, a.K, a.hs, static_cast<Op>(a.scale)); \
    } else if (contig) {                                                                                       \
      bwd_dispatch<IN, OUT, true>(a, m0, m1);                                                                  \
    } else {                                                                                                   \
      bwd_dispatch<IN, OUT, false>(a, m0, m1);                                                                 \
    }                                                                                                          \
  }

LK_DEFINE_ROWS(rows_f32, F32, F32)
LK_DEFINE_ROWS(rows_f16, F16, F32)
LK_DEFINE_ROWS(rows_bf16, BF16, F32)
LK_DEFINE_ROWS(rows_f64, F64, F64)

LK_CLONES void dequant_f32(const uint8_t* p, const float* c, const float* a, int64_t bs, int64_t e0, int64_t e1,
                           void* out) {
  dequant_range<F32>(p, c, a, bs, e0, e1, static_cast<float*>(out));
}
LK_CLONES void dequant_bf16(const uint8_t* p, const float* c, const float* a, int64_t bs, int64_t e0, int64_t e1,
                            void* out) {
  dequant_range<BF16>(p, c, a, bs, e0, e1, static_cast<uint16_t*>(out));
}
LK_CLONES void dequant_f16(const uint8_t* p, const float* c, const float* a, int64_t bs, int64_t e0, int64_t e1,
                           void* out) {
  dequant_range<F16>(p, c, a, bs, e0, e1, static_cast<uint16_t*>(out));
}

LK_CLONES void rows_keep(uint8_t* out, int64_t m0, int64_t m1, int64_t K, const Hash& hs) {
  keep_rows(out, m0, m1, K, hs);
}

// The decoder-block ops, one clone set per element type.
#define LK_DEFINE_BLOCK(SUFFIX, E)                                                                                     \
  LK_CLONES void rms_fwd_##SUFFIX(const void* x, const void* w, void* y, float* rstd, int64_t m0, int64_t m1,          \
                                  int64_t K, float eps) {                                                              \
    using T = E::T;                                                                                                    \
    rms_forward_rows<E>(static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), rstd, m0, m1, K, eps); \
  }                                                                                                                    \
  LK_CLONES void rms_bwd_##SUFFIX(const void* dy, const void* x, const void* w, const float* rstd, void* dx,           \
                                  int64_t m0, int64_t m1, int64_t K) {                                                 \
    using T = E::T;                                                                                                    \
    rms_backward_rows<E>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), rstd,          \
                         static_cast<T*>(dx), m0, m1, K);                                                              \
  }                                                                                                                    \
  LK_CLONES void silu_fwd_##SUFFIX(const void* g, const void* u, void* y, int64_t i0, int64_t i1) {                    \
    using T = E::T;                                                                                                    \
    silu_mul_forward_range<E>(static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(y), i0, i1);         \
  }                                                                                                                    \
  LK_CLONES void silu_bwd_##SUFFIX(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t i0,       \
                                   int64_t i1) {                                                                       \
    using T = E::T;                                                                                                    \
    silu_mul_backward_range<E>(static_cast<const T*>(dy), static_cast<const T*>(g), static_cast<const T*>(u),          \
                               static_cast<T*>(dg), static_cast<T*>(du), i0, i1);                                      \
  }
LK_DEFINE_BLOCK(f32, F32)
LK_DEFINE_BLOCK(bf16, BF16)
LK_DEFINE_BLOCK(f16, F16)
#undef LK_DEFINE_BLOCK

template <class F>
void parallel_rows(int64_t M, int64_t K, int nthreads, F&& f) {
  int64_t nt = nthreads;
  if (M * K < kParallelMinElems) nt = 1;
  if (nt > M) nt = M;
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
      const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
      f(M * i / n, M * (i + 1) / n);
    }
    return;
  }
#endif
  if (M > 0) f(0, M);
}

[[noreturn]] void bad(const char* call, const std::string& msg) {
  throw std::invalid_argument(std::string(call) + ": " + msg);
}

int64_t elem_bytes(const char* call, int dtype) {
  switch (dtype) {
    case kFloat32:
      return 4;
    case kFloat16:
    case kBFloat16:
      return 2;
    case kFloat64:
      return 8;
    default:
      bad(call,
          "dtype must be a code 0 (float32), 1 (float16), 2 (bfloat16) or 3 (float64), got " + std::to_string(dtype));
  }
}

void check_ptr(const char* call, const char* name, uint64_t p, int64_t bytes, bool needed) {
  if (p == 0) {
    if (needed) bad(call, std::string(name) + " must be a non-null address");
    return;
  }
  if (p % static_cast<uint64_t>(bytes) != 0)
    bad(call, std::string(name) + " must be aligned to its element size (" + std::to_string(bytes) + " bytes)");
}

void check_nonneg(const char* call, const char* name, int64_t v) {
  if (v < 0) bad(call, std::string(name) + " must be >= 0, got " + std::to_string(v));
}

Hash make_hash(const char* call, uint64_t seed, uint64_t offset, uint64_t threshold) {
  if (seed >= (uint64_t(1) << 63)) bad(call, "seed must be < 2**63, got " + std::to_string(seed));
  if (offset >= (uint64_t(1) << 63)) bad(call, "offset must be < 2**63, got " + std::to_string(offset));
  if (threshold > 0xFFFFFFFFull) bad(call, "threshold must fit in 32 bits, got " + std::to_string(threshold));
  const lora::DropoutParams d = lora::make_dropout_params(true, seed, offset, static_cast<uint32_t>(threshold), 1.0);
  return Hash{d.key_lo, d.key_hi, d.threshold, d.offset};
}

void run_rows(int dtype, const Args& a, int64_t M, int nthreads, bool backward) {
  auto fn = dtype == kFloat32 ? rows_f32 : dtype == kFloat16 ? rows_f16 : dtype == kBFloat16 ? rows_bf16 : rows_f64;
  parallel_rows(M, a.K, nthreads, [&](int64_t m0, int64_t m1) { fn(a, m0, m1, backward); });
}

void check_common(const char* call, int64_t M, int64_t K, int dtype, double scale, int nthreads) {
  check_nonneg(call, "M", M);
  check_nonneg(call, "K", K);
  elem_bytes(call, dtype);
  if (!(std::isfinite(scale) && scale >= 1.0)) bad(call, "scale (1 / (1 - p)) must be finite and >= 1");
  if (nthreads < 1) bad(call, "nthreads must be >= 1, got " + std::to_string(nthreads));
}

void dropout_forward(uint64_t x, int64_t sxm, int64_t sxk, uint64_t out, int64_t som, int64_t M, int64_t K, int dtype,
                     uint64_t seed, uint64_t offset, uint64_t threshold, double scale, int nthreads) {
  const char* call = "lora_kernels._cpu.dropout_forward";
  check_common(call, M, K, dtype, scale, nthreads);
  check_nonneg(call, "stride_x_m", sxm);
  check_nonneg(call, "stride_x_k", sxk);
  check_nonneg(call, "stride_out_m", som);
  const bool any = M * K > 0;
  const int64_t acc_bytes = dtype == kFloat64 ? 8 : 4;
  check_ptr(call, "x", x, elem_bytes(call, dtype), any);
  check_ptr(call, "out", out, acc_bytes, any);
  if (any && som < K) bad(call, "stride_out_m must be >= K (rows of out must not overlap)");
  const Hash hs = make_hash(call, seed, offset, threshold);
  if (!any) return;
  Args a{reinterpret_cast<const void*>(x),
         sxm,
         sxk,
         reinterpret_cast<void*>(out),
         som,
         nullptr,
         0,
         nullptr,
         0,
         K,
         hs,
         scale,
         0.0};
  py::gil_scoped_release nogil;
  run_rows(dtype, a, M, nthreads, false);
}

void dropout_backward(uint64_t x, int64_t sxm, int64_t sxk, uint64_t xd, int64_t som, uint64_t t, int64_t stm,
                      uint64_t dx, int64_t sdm, int64_t M, int64_t K, int dtype, uint64_t seed, uint64_t offset,
                      uint64_t threshold, double scale, double alpha, int nthreads) {
  const char* call = "lora_kernels._cpu.dropout_backward";
  check_common(call, M, K, dtype, scale, nthreads);
  for (auto [name, v] : {std::pair<const char*, int64_t>{"stride_x_m", sxm},
                         {"stride_x_k", sxk},
                         {"stride_xd_m", som},
                         {"stride_t_m", stm},
                         {"stride_dx_m", sdm}})
    check_nonneg(call, name, v);
  if (!std::isfinite(alpha)) bad(call, "alpha must be finite");
  const bool any = M * K > 0;
  if (any && xd == 0 && dx == 0) bad(call, "at least one of xd and dx must be given (non-zero)");
  const int64_t eb = elem_bytes(call, dtype), acc_bytes = dtype == kFloat64 ? 8 : 4;
  check_ptr(call, "x", x, eb, any && xd != 0);
  check_ptr(call, "xd", xd, acc_bytes, false);
  check_ptr(call, "t", t, eb, any && dx != 0);
  check_ptr(call, "dx", dx, eb, false);
  if (any && xd != 0 && som < K) bad(call, "stride_xd_m must be >= K (rows of xd must not overlap)");
  if (any && dx != 0 && sdm < K) bad(call, "stride_dx_m must be >= K (rows of dx must not overlap)");
  const Hash hs = make_hash(call, seed, offset, threshold);
  if (!any) return;
  Args a{reinterpret_cast<const void*>(x),
         sxm,
         sxk,
         reinterpret_cast<void*>(xd),
         som,
         reinterpret_cast<const void*>(t),
         stm,
         reinterpret_cast<void*>(dx),
         sdm,
         K,
         hs,
         scale,
         alpha};
  py::gil_scoped_release nogil;
  run_rows(dtype, a, M, nthreads, true);
}

py::bytes keep_mask(uint64_t seed, uint64_t offset, int64_t M, int64_t K, uint64_t threshold, int nthreads) {
  const char* call = "lora_kernels._cpu.keep_mask";
  check_nonneg(call, "M", M);
  check_nonneg(call, "K", K);
  if (M * K > (int64_t(1) << 30)) bad(call, "M * K must be <= 2**30 for a mask of bytes");
  if (nthreads < 1) bad(call, "nthreads must be >= 1, got " + std::to_string(nthreads));
  const Hash hs = make_hash(call, seed, offset, threshold);
  std::string out(static_cast<size_t>(M * K), '\0');
  auto* p = reinterpret_cast<uint8_t*>(out.data());
  {
    py::gil_scoped_release nogil;
    parallel_rows(M, K, nthreads, [&](int64_t m0, int64_t m1) { rows_keep(p, m0, m1, K, hs); });
  }
  return py::bytes(out);
}

// out[j] = dtype(code[nibble(e0 + j)] * absmax[(e0 + j) / blocksize]), j < e1 - e0: elements [e0, e1) of a
// bitsandbytes 4-bit weight (packed: its uint8 storage from element 0; code: 16 fp32; absmax: fp32 per block).
void dequant_4bit(uint64_t packed, uint64_t code, uint64_t absmax, uint64_t out, int64_t e0, int64_t e1,
                  int64_t blocksize, int dtype, int nthreads) {
  const char* call = "lora_kernels._cpu.dequant_4bit";
  check_nonneg(call, "e0", e0);
  if (e1 < e0) bad(call, "e1 must be >= e0, got e0=" + std::to_string(e0) + ", e1=" + std::to_string(e1));
  if (blocksize < 2 || blocksize % 2)
    bad(call, "blocksize must be an even number >= 2, got " + std::to_string(blocksize));
  if (dtype == kFloat64) bad(call, "dtype must be float32, float16 or bfloat16 (codes 0, 1, 2), got 3 (float64)");
  if (nthreads < 1) bad(call, "nthreads must be >= 1, got " + std::to_string(nthreads));
  const int64_t eb = elem_bytes(call, dtype);
  const bool any = e1 > e0;
  check_ptr(call, "packed", packed, 1, any);
  check_ptr(call, "code", code, 4, any);
  check_ptr(call, "absmax", absmax, 4, any);
  check_ptr(call, "out", out, eb, any);
  if (!any) return;
  auto fn = dtype == kFloat32 ? dequant_f32 : dtype == kBFloat16 ? dequant_bf16 : dequant_f16;
  const auto* p = reinterpret_cast<const uint8_t*>(packed);
  const auto* c = reinterpret_cast<const float*>(code);
  const auto* a = reinterpret_cast<const float*>(absmax);
  auto* o = reinterpret_cast<uint8_t*>(out);
  const int64_t n = e1 - e0;
  py::gil_scoped_release nogil;
  // split into whole blocks per thread (parallel_rows over blocks of one element each, then scaled)
  const int64_t nb = (n + blocksize - 1) / blocksize;
  parallel_rows(nb, blocksize, nthreads, [&](int64_t b0, int64_t b1) {
    const int64_t s = e0 + b0 * blocksize, t = e0 + b1 * blocksize < e1 ? e0 + b1 * blocksize : e1;
    if (s < t) fn(p, c, a, blocksize, s, t, o + (s - e0) * eb);
  });
}

// --- decoder-block ops (block_kernels.h): contiguous row-major [M, K] tensors of one dtype (fp32 / fp16 / bf16) ---

void check_block(const char* call, int64_t M, int64_t K, int dtype, int nthreads) {
  check_nonneg(call, "M", M);
  check_nonneg(call, "K", K);
  elem_bytes(call, dtype);
  if (dtype == kFloat64) bad(call, "dtype must be float32, float16 or bfloat16 (codes 0, 1, 2), got 3 (float64)");
  if (nthreads < 1) bad(call, "nthreads must be >= 1, got " + std::to_string(nthreads));
}

void rms_norm_forward(uint64_t x, uint64_t w, uint64_t y, uint64_t rstd, int64_t M, int64_t K, double eps, int dtype,
                      int nthreads) {
  const char* call = "lora_kernels._cpu.rms_norm_forward";
  check_block(call, M, K, dtype, nthreads);
  if (!(std::isfinite(eps) && eps >= 0)) bad(call, "eps must be finite and >= 0");
  const int64_t eb = elem_bytes(call, dtype);
  const bool any = M > 0 && K > 0;
  for (auto [name, ptr] : {std::pair{"x", x}, {"weight", w}, {"y", y}}) check_ptr(call, name, ptr, eb, any);
  check_ptr(call, "rstd", rstd, 4, any);
  if (!any) return;
  auto fn = dtype == kFloat32 ? rms_fwd_f32 : dtype == kBFloat16 ? rms_fwd_bf16 : rms_fwd_f16;
  auto* r = reinterpret_cast<float*>(rstd);
  const auto* xp = reinterpret_cast<const void*>(x);
  const auto* wp = reinterpret_cast<const void*>(w);
  auto* yp = reinterpret_cast<void*>(y);
  py::gil_scoped_release nogil;
  parallel_rows(M, K, nthreads, [&](int64_t m0, int64_t m1) { fn(xp, wp, yp, r, m0, m1, K, static_cast<float>(eps)); });
}

void rms_norm_backward(uint64_t dy, uint64_t x, uint64_t w, uint64_t rstd, uint64_t dx, int64_t M, int64_t K, int dtype,
                       int nthreads) {
  const char* call = "lora_kernels._cpu.rms_norm_backward";
  check_block(call, M, K, dtype, nthreads);
  const int64_t eb = elem_bytes(call, dtype);
  const bool any = M > 0 && K > 0;
  for (auto [name, ptr] : {std::pair{"dy", dy}, {"x", x}, {"weight", w}, {"dx", dx}})
    check_ptr(call, name, ptr, eb, any);
  check_ptr(call, "rstd", rstd, 4, any);
  if (!any) return;
  auto fn = dtype == kFloat32 ? rms_bwd_f32 : dtype == kBFloat16 ? rms_bwd_bf16 : rms_bwd_f16;
  const auto* r = reinterpret_cast<const float*>(rstd);
  const auto *dyp = reinterpret_cast<const void*>(dy), *xp = reinterpret_cast<const void*>(x);
  const auto* wp = reinterpret_cast<const void*>(w);
  auto* dxp = reinterpret_cast<void*>(dx);
  py::gil_scoped_release nogil;
  parallel_rows(M, K, nthreads, [&](int64_t m0, int64_t m1) { fn(dyp, xp, wp, r, dxp, m0, m1, K); });
}

void silu_mul_forward(uint64_t g, uint64_t u, uint64_t y, int64_t n, int dtype, int nthreads) {
  const char* call = "lora_kernels._cpu.silu_mul_forward";
  check_block(call, n, 1, dtype, nthreads);
  const int64_t eb = elem_bytes(call, dtype);
  for (auto [name, ptr] : {std::pair{"gate", g}, {"up", u}, {"y", y}}) check_ptr(call, name, ptr, eb, n > 0);
  if (n == 0) return;
  auto fn = dtype == kFloat32 ? silu_fwd_f32 : dtype == kBFloat16 ? silu_fwd_bf16 : silu_fwd_f16;
  const auto *gp = reinterpret_cast<const void*>(g), *up = reinterpret_cast<const void*>(u);
  auto* yp = reinterpret_cast<void*>(y);
  py::gil_scoped_release nogil;
  parallel_rows(n, 1, nthreads, [&](int64_t i0, int64_t i1) { fn(gp, up, yp, i0, i1); });
}

void silu_mul_backward(uint64_t dy, uint64_t g, uint64_t u, uint64_t dg, uint64_t du, int64_t n, int dtype,
                       int nthreads) {
  const char* call = "lora_kernels._cpu.silu_mul_backward";
  check_block(call, n, 1, dtype, nthreads);
  const int64_t eb = elem_bytes(call, dtype);
  for (auto [name, ptr] : {std::pair{"dy", dy}, {"gate", g}, {"up", u}, {"d_gate", dg}, {"d_up", du}})
    check_ptr(call, name, ptr, eb, n > 0);
  if (n == 0) return;
  auto fn = dtype == kFloat32 ? silu_bwd_f32 : dtype == kBFloat16 ? silu_bwd_bf16 : silu_bwd_f16;
  const auto *dyp = reinterpret_cast<const void*>(dy), *gp = reinterpret_cast<const void*>(g);
  const auto* up = reinterpret_cast<const void*>(u);
  auto *dgp = reinterpret_cast<void*>(dg), *dup = reinterpret_cast<void*>(du);
  py::gil_scoped_release nogil;
  parallel_rows(n, 1, nthreads, [&](int64_t i0, int64_t i1) { fn(dyp, gp, up, dgp, dup, i0, i1); });
}

}  // namespace

PYBIND11_MODULE(_cpu, mod) {
  mod.doc() =
      "lora_kernels CPU dropout pass, 4-bit dequant and decoder-block ops (torch-free binding: raw addresses, sizes, "
      "element strides, dtype codes)";
  mod.attr("DTYPE_CODES") =
      py::dict(py::arg("float32") = 0, py::arg("float16") = 1, py::arg("bfloat16") = 2, py::arg("float64") = 3);
#ifdef _OPENMP
  mod.attr("OPENMP") = true;
#else
  mod.attr("OPENMP") = false;
#endif
  mod.attr("CLONES") = LK_CLONE_LIST;
  mod.attr("PARALLEL_MIN_ELEMS") = kParallelMinElems;
  mod.def("rms_norm_forward", &rms_norm_forward, py::arg("x"), py::arg("weight"), py::arg("y"), py::arg("rstd"),
          py::arg("M"), py::arg("K"), py::arg("eps"), py::arg("dtype"), py::arg("nthreads"),
          "Llama RMSNorm of contiguous [M, K] rows: y = weight * T(x * rstd), rstd[M] (fp32) saved for backward.");
  mod.def("rms_norm_backward", &rms_norm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
          py::arg("dx"), py::arg("M"), py::arg("K"), py::arg("dtype"), py::arg("nthreads"),
          "dx of rms_norm_forward (the weight's gradient is left to the caller).");
  mod.def("silu_mul_forward", &silu_mul_forward, py::arg("gate"), py::arg("up"), py::arg("y"), py::arg("n"),
          py::arg("dtype"), py::arg("nthreads"), "y = T(silu(gate)) * up over n contiguous elements.");
  mod.def("silu_mul_backward", &silu_mul_backward, py::arg("dy"), py::arg("gate"), py::arg("up"), py::arg("d_gate"),
          py::arg("d_up"), py::arg("n"), py::arg("dtype"), py::arg("nthreads"),
          "d_gate, d_up of silu_mul_forward over n contiguous elements.");
  mod.def("dropout_forward", &dropout_forward, py::arg("x"), py::arg("stride_x_m"), py::arg("stride_x_k"),
          py::arg("out"), py::arg("stride_out_m"), py::arg("M"), py::arg("K"), py::arg("dtype"), py::arg("seed"),
          py::arg("offset"), py::arg("threshold"), py::arg("scale"), py::arg("nthreads"),
          "out[m, k] = x[m, k] * keep(m, k) * scale, rounded to x's dtype, stored in fp32 (fp64 for fp64 x); "
          "out has unit inner stride.");
  mod.def("dropout_backward", &dropout_backward, py::arg("x"), py::arg("stride_x_m"), py::arg("stride_x_k"),
          py::arg("xd"), py::arg("stride_xd_m"), py::arg("t"), py::arg("stride_t_m"), py::arg("dx"),
          py::arg("stride_dx_m"), py::arg("M"), py::arg("K"), py::arg("dtype"), py::arg("seed"), py::arg("offset"),
          py::arg("threshold"), py::arg("scale"), py::arg("alpha"), py::arg("nthreads"),
          "One mask evaluation for both backward uses: dx += alpha * (t * keep) in place (when dx != 0) and "
          "xd = x * keep * scale as dropout_forward (when xd != 0). t, dx, xd have unit inner strides.");
  mod.def("dequant_4bit", &dequant_4bit, py::arg("packed"), py::arg("code"), py::arg("absmax"), py::arg("out"),
          py::arg("e0"), py::arg("e1"), py::arg("blocksize"), py::arg("dtype"), py::arg("nthreads"),
          "Elements [e0, e1) of a bitsandbytes 4-bit weight: out[j] = code[nibble] * absmax[block], rounded once to "
          "dtype (0 float32, 1 float16, 2 bfloat16); packed is the uint8 storage from element 0.");
  mod.def("keep_mask", &keep_mask, py::arg("seed"), py::arg("offset"), py::arg("M"), py::arg("K"), py::arg("threshold"),
          py::arg("nthreads") = 1, "The keep-mask alone: M*K bytes, row-major, 1 = kept.");
}
