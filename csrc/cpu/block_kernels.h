// Row kernels of the fused decoder-block ops of lora_kernels._cpu: RMSNorm (Llama's) and SiLU(gate) * up, forward
// and backward, one pass per row each instead of the 6-10 torch ops (and their temporaries) of the eager modules.
//
// Numerics follow the eager modules of Hugging Face transformers step by step, so the result differs from them only
// by the order of one row sum and by the exp below (both a few ulp in fp32):
//   RMSNorm:  h = float(x) * rstd, rstd = 1 / sqrt(mean(float(x)^2) + eps);  y = w * T(h)   (T: x's dtype)
//   SiLU-mul: a = T(silu(float(g)));  y = T(a * u)
// and the backward is what autograd computes through those expressions, with the same roundings to T.
#pragma once

#include <cmath>
#include <cstdint>

#include "dropout_kernels.h"  // LK_INLINE, bits_to_f32, the element types F32 / BF16 / F16

namespace lora_cpu {

// exp(x) in fp32 without a library call (so the loops vectorize): x = n ln2 + r with |r| <= ln2 / 2, e^r by the
// polynomial of Cephes' expf (its published coefficients), 2^n from the exponent bits. About 1 ulp; the input is
// clamped to [-87, 88] (outside it e^x under- or overflows fp32, and callers only form 1 + e^x).
LK_INLINE float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  // explicit fma (one vfmadd where the ISA clone has FMA): the module is built with -ffp-contract=off
  const float r = std::fma(n, 2.12194440e-4f, std::fma(n, -0.693359375f, x));  // ln 2 in two parts (Cephes' C1, C2)
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r + 1.0f);
  const int32_t e = static_cast<int32_t>(n) + 127;
  return p * bits_to_f32(static_cast<uint32_t>(e) << 23);
}

constexpr int kLanes = 16;  // partial sums per row: a vectorizable reduction without -ffast-math

// Sum over k < K of f(k) in 16 interleaved partial sums (fixed order: deterministic for every thread count).
template <class F>
LK_INLINE float row_sum(int64_t K, F&& f) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += f(k + j);
  float tail = 0.0f;
  for (; k < K; ++k) tail += f(k);
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s + tail;
}

// y[m, :] = w * T(x[m, :] * rstd[m]) for rows [m0, m1); rows contiguous (row stride K); rstd saved in fp32.
template <class E>
LK_INLINE void rms_forward_rows(const typename E::T* x, const typename E::T* w, typename E::T* y, float* rstd,
                                int64_t m0, int64_t m1, int64_t K, float eps) {
  for (int64_t m = m0; m < m1; ++m) {
    const typename E::T* xr = x + m * K;
    typename E::T* yr = y + m * K;
    const float ss = row_sum(K, [&](int64_t k) {
      const float v = E::load(xr[k]);
      return v * v;
    });
    const float rs = 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
    rstd[m] = rs;
    for (int64_t k = 0; k < K; ++k) yr[k] = E::store(E::load(w[k]) * E::load(E::store(E::load(xr[k]) * rs)));
  }
}

// dx[m, :] for rows [m0, m1) from dy, x, w and the saved rstd:
//   dh = float(T(dy * w));  dx = T(rstd * dh - (rstd^3 / K) * (dh . x) * x)
template <class E>
LK_INLINE void rms_backward_rows(const typename E::T* dy, const typename E::T* x, const typename E::T* w,
                                 const float* rstd, typename E::T* dx, int64_t m0, int64_t m1, int64_t K) {
  for (int64_t m = m0; m < m1; ++m) {
    const typename E::T* dyr = dy + m * K;
    const typename E::T* xr = x + m * K;
    typename E::T* dxr = dx + m * K;
    const float rs = rstd[m];
    const float dot = row_sum(K, [&](int64_t k) {
      const float dh = E::load(E::store(E::load(dyr[k]) * E::load(w[k])));
      return dh * E::load(xr[k]);
    });
    const float c = rs * rs * rs * dot / static_cast<float>(K);
    for (int64_t k = 0; k < K; ++k) {
      const float dh = E::load(E::store(E::load(dyr[k]) * E::load(w[k])));
      dxr[k] = E::store(rs * dh - c * E::load(xr[k]));
    }
  }
}

// y[i] = T(T(silu(g[i])) * u[i]) for elements [i0, i1).
template <class E>
LK_INLINE void silu_mul_forward_range(const typename E::T* g, const typename E::T* u, typename E::T* y, int64_t i0,
                                      int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float gv = E::load(g[i]);
    const float a = E::load(E::store(gv / (1.0f + exp_f32(-gv))));
    y[i] = E::store(a * E::load(u[i]));
  }
}

// dg[i], du[i] for elements [i0, i1): a = T(silu(g)), da = T(dy * u), du = T(dy * a),
// dg = T(da * s * (1 + g * (1 - s))) with s = sigmoid(g) (torch's silu_backward).
template <class E>
LK_INLINE void silu_mul_backward_range(const typename E::T* dy, const typename E::T* g, const typename E::T* u,
                                       typename E::T* dg, typename E::T* du, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float gv = E::load(g[i]), d = E::load(dy[i]);
    const float e1 = 1.0f + exp_f32(-gv);
    const float s = 1.0f / e1;
    const float a = E::load(E::store(gv / e1));
    const float da = E::load(E::store(d * E::load(u[i])));
    du[i] = E::store(d * a);
    dg[i] = E::store(da * (s * (1.0f + gv * (1.0f - s))));
  }
}

}  // namespace lora_cpu
