// The dropout hash of lora_kernels/backends/mask.py, mirrored bit for bit (that file is the definition; read it first).
//
//   mix32(x) = lowbias32:  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16  (mod 2^32)
//   key_lo   = mix32((seed       & 0xFFFFFFFF) ^ 0x243F6A88)
//   key_hi   = mix32(((seed>>32) & 0xFFFFFFFF) ^ 0x85A308D3)
//   c        = offset + m*K + k                       (64-bit element counter, never the tile or program id)
//   h        = mix32(mix32((c & 0xFFFFFFFF) ^ key_lo) ^ (c >> 32) ^ key_hi)
//   keep     = h >= threshold                          (threshold = min(round(p * 2^32), 2^32 - 1), host side)
//
// __host__ __device__ so that the binding can expose the host copy to the CPU tests
// (tests/test_cuda_build.py compares it with lora_kernels.backends.mask.dropout_keep_mask without a GPU).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORA_HD __host__ __device__ __forceinline__
#else
#define LORA_HD inline
#endif

namespace lora {

LORA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct DropoutParams {
  uint32_t key_lo;     // mix32(seed_lo ^ salt_lo), computed once per launch on the host
  uint32_t key_hi;     // mix32(seed_hi ^ salt_hi)
  uint32_t threshold;  // keep iff hash >= threshold
  float inv_keep;      // 1 / (1 - p), rounded to fp32 as torch does for a Python-float multiplier
  uint64_t offset;     // added to the element counter m*K + k
  bool enabled;        // p > 0
};

inline DropoutParams make_dropout_params(bool enabled, uint64_t seed, uint64_t offset, uint32_t threshold,
                                         double inv_keep) {
  DropoutParams d;
  d.key_lo = mix32(static_cast<uint32_t>(seed & 0xFFFFFFFFull) ^ 0x243F6A88u);
  d.key_hi = mix32(static_cast<uint32_t>(seed >> 32) ^ 0x85A308D3u);
  d.threshold = threshold;
  d.inv_keep = static_cast<float>(inv_keep);
  d.offset = offset;
  d.enabled = enabled;
  return d;
}

// True when element (m, k) of an [M, K] input is kept.
LORA_HD bool dropout_keep(const DropoutParams& d, int64_t m, int64_t k, int64_t K) {
  const uint64_t c = d.offset + static_cast<uint64_t>(m) * static_cast<uint64_t>(K) + static_cast<uint64_t>(k);
  const uint32_t h = mix32(mix32(static_cast<uint32_t>(c) ^ d.key_lo) ^ static_cast<uint32_t>(c >> 32) ^ d.key_hi);
  return h >= d.threshold;
}

}  // namespace lora
