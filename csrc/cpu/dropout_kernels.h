// Row kernels of the CPU dropout op (lora_kernels._cpu): hash + select + scale in one pass over a row range.
//
// The mask is the package's one definition (lora_kernels/backends/mask.py; the hash itself, mix32, comes from
// csrc/lora_rng.cuh, shared with the CUDA kernels):
//
//   c = offset + m*K + k   (uint64)     h = mix32(mix32(lo32(c) ^ key_lo) ^ hi32(c) ^ key_hi)     keep = h >= threshold
//
// Inside one row the counter's high word changes at most where its low word wraps, so each row is split into
// segments with a constant high word; the inner loop is then pure uint32 arithmetic on consecutive counters,
// which the compiler vectorises (vpmulld; 16 lanes with AVX-512). Values follow the torch oracle exactly:
// ``(x * keep) * scale`` in the op math type (float for fp32/fp16/bf16, double for fp64), rounded once to the
// activation dtype, so a dropped inf/NaN gives NaN as ``x * 0`` does in torch. This file is plain C++ (no pybind11,
// no libtorch, no OpenMP); binding.cpp splits rows over threads and calls these.
#pragma once

#include <cstdint>
#include <cstring>

#include "lora_rng.cuh"

#if defined(__GNUC__)
#define LK_INLINE inline __attribute__((always_inline))
#else
#define LK_INLINE inline
#endif

namespace lora_cpu {

struct Hash {
  uint32_t key_lo, key_hi, threshold;
  uint64_t offset;
};

LK_INLINE float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
LK_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Element types: storage type T, op math type Op, load (T -> Op), store (Op -> T, round to nearest even).
struct F32 {
  using T = float;
  using Op = float;
  static LK_INLINE float load(float v) { return v; }
  static LK_INLINE float store(float v) { return v; }
};

struct F64 {
  using T = double;
  using Op = double;
  static LK_INLINE double load(double v) { return v; }
  static LK_INLINE double store(double v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  using Op = float;
  static LK_INLINE float load(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }
  static LK_INLINE uint16_t store(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;                    // round half to even
    return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);  // NaN -> canonical
  }
};

struct F16 {
  using T = uint16_t;
  using Op = float;
  static LK_INLINE float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    const uint32_t normal = sign | ((e + 112u) << 23) | (m << 13);      // rebias 15 -> 127
    const uint32_t special = sign | 0x7F800000u | (m << 13);            // inf / NaN
    const float sub = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    const uint32_t subnormal = sign | f32_to_bits(sub);
    return bits_to_f32(e == 0x1Fu ? special : (e == 0 ? subnormal : normal));
  }
  static LK_INLINE uint16_t store(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    // normal half (|f| >= 2^-14): rebias the exponent, round the 13 dropped mantissa bits half to even
    const uint32_t r = a - 0x38000000u;
    const uint32_t normal = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
    // subnormal half: adding 0.5 rounds |f| to a multiple of 2^-24 (the ulp of [0.5, 1)), half to even
    const uint32_t subnormal = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3F000000u;
    uint32_t out = a >= 0x38800000u ? normal : subnormal;
    out = a >= 0x477FF000u ? 0x7C00u : out;  // >= 65520 rounds to inf
    out = a > 0x7F800000u ? 0x7E00u : out;   // NaN
    return static_cast<uint16_t>(sign | out);
  }
};

// The value the torch oracle produces for x·keep·scale in In's dtype, handed on in Out's dtype (Out is In, or fp32
// for fp16/bf16 input: the value is first rounded to In, so it is exactly what `.float()` of the oracle gives).
template <class In, class Out>
LK_INLINE typename Out::T dropped_value(typename In::T x, typename In::Op keep, typename In::Op scale) {
  using Op = typename In::Op;
  const Op v = (In::load(x) * keep) * scale;
  if constexpr (sizeof(typename In::T) == 2) {
    return Out::store(In::load(In::store(v)));
  } else {
    return Out::store(v);
  }
}

// Calls body(k_begin, n, lo, hk) for the segments of row m where hi32 of the counter is constant:
// counters offset + m*K + k_begin + j, j < n, have low word lo + j (no wrap) and high word ^ key_hi = hk.
template <class Body>
LK_INLINE void for_each_segment(const Hash& hs, int64_t m, int64_t K, Body&& body) {
  const uint64_t c0 = hs.offset + static_cast<uint64_t>(m) * static_cast<uint64_t>(K);
  int64_t k = 0;
  while (k < K) {
    const uint64_t c = c0 + static_cast<uint64_t>(k);
    const uint32_t lo = static_cast<uint32_t>(c);
    const uint64_t to_wrap = (uint64_t(1) << 32) - lo;
    const int64_t n = static_cast<int64_t>(to_wrap < static_cast<uint64_t>(K - k) ? to_wrap : K - k);
    body(k, n, lo, static_cast<uint32_t>(c >> 32) ^ hs.key_hi);
    k += n;
  }
}

LK_INLINE uint32_t hash_at(const Hash& hs, uint32_t lo, uint32_t hk) {
  return lora::mix32(lora::mix32(lo ^ hs.key_lo) ^ hk);
}

// out[m, :] = dropped x[m, :] for rows [m0, m1); x strides (sxm, sxk), out row stride som (unit inner stride).
template <class In, class Out, bool Contig>
LK_INLINE void forward_rows(const typename In::T* x, int64_t sxm, int64_t sxk, typename Out::T* out, int64_t som,
                            int64_t m0, int64_t m1, int64_t K, const Hash& hs, typename In::Op scale) {
  using Op = typename In::Op;
  for (int64_t m = m0; m < m1; ++m) {
    const typename In::T* xr = x + m * sxm;
    typename Out::T* orow = out + m * som;
    for_each_segment(hs, m, K, [&](int64_t k0, int64_t n, uint32_t lo, uint32_t hk) {
      const typename In::T* xs = xr + (Contig ? k0 : k0 * sxk);
      typename Out::T* os = orow + k0;
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t h = hash_at(hs, lo + static_cast<uint32_t>(j), hk);
        const Op keep = h >= hs.threshold ? Op(1) : Op(0);
        os[j] = dropped_value<In, Out>(xs[Contig ? j : j * sxk], keep, scale);
      }
    });
  }
}

// Backward over rows [m0, m1), one mask evaluation per element for both uses:
//   DoDx: dx[m, :] = dx + alpha · (t ⊙ keep)            (dx, t: activation dtype, row strides sdm, stm, unit inner)
//   DoXd: xd[m, :] = dropped x[m, :] in Out's dtype      (the dA operand)
template <class In, class Out, bool Contig, bool DoDx, bool DoXd>
LK_INLINE void backward_rows(const typename In::T* x, int64_t sxm, int64_t sxk, typename Out::T* xd, int64_t som,
                             const typename In::T* t, int64_t stm, typename In::T* dx, int64_t sdm, int64_t m0,
                             int64_t m1, int64_t K, const Hash& hs, typename In::Op scale, typename In::Op alpha) {
  using Op = typename In::Op;
  for (int64_t m = m0; m < m1; ++m) {
    for_each_segment(hs, m, K, [&](int64_t k0, int64_t n, uint32_t lo, uint32_t hk) {
      const typename In::T* xs = x + m * sxm + (Contig ? k0 : k0 * sxk);
      typename Out::T* os = xd + m * som + k0;
      const typename In::T* ts = t + m * stm + k0;
      typename In::T* ds = dx + m * sdm + k0;
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t h = hash_at(hs, lo + static_cast<uint32_t>(j), hk);
        const Op keep = h >= hs.threshold ? Op(1) : Op(0);
        if constexpr (DoDx) ds[j] = In::store(In::load(ds[j]) + alpha * (In::load(ts[j]) * keep));
        if constexpr (DoXd) os[j] = dropped_value<In, Out>(xs[Contig ? j : j * sxk], keep, scale);
      }
    });
  }
}

// keep[m, k] as bytes (1 = kept), rows [m0, m1), row-major: the mask alone, for the tests.
LK_INLINE void keep_rows(uint8_t* out, int64_t m0, int64_t m1, int64_t K, const Hash& hs) {
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* orow = out + m * K;
    for_each_segment(hs, m, K, [&](int64_t k0, int64_t n, uint32_t lo, uint32_t hk) {
      for (int64_t j = 0; j < n; ++j)
        orow[k0 + j] = hash_at(hs, lo + static_cast<uint32_t>(j), hk) >= hs.threshold ? 1 : 0;
    });
  }
}

}  // namespace lora_cpu
