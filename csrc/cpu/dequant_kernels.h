// Row kernel of the CPU 4-bit dequantization (lora_kernels._cpu.dequant_4bit): bitsandbytes' NF4/FP4 layout.
//
// Element i of the flattened weight is the nibble i of the packed bytes (high nibble first: byte i/2 >> 4 for even
// i, & 0xF for odd i), looked up in the 16-entry fp32 code book and multiplied in fp32 by its block's fp32 scale
// absmax[i / blocksize]; the product is rounded once to the output dtype (round to nearest even). This is what
// lora_kernels/quant/nf4.py's torch ops compute (their oracle is bitsandbytes' reference), bit for bit.
#pragma once

#include <cstdint>

#include "dropout_kernels.h"  // element types: F32, BF16, F16 (load / store)

namespace lora_cpu {

// out[j] = Out(code[nibble(e0 + j)] * absmax[(e0 + j) / bs]) for j < e1 - e0.
template <class Out>
LK_INLINE void dequant_range(const uint8_t* packed, const float* code, const float* absmax, int64_t bs, int64_t e0,
                             int64_t e1, typename Out::T* out) {
  int64_t i = e0;
  while (i < e1) {
    const int64_t block = i / bs;
    const int64_t stop = (block + 1) * bs < e1 ? (block + 1) * bs : e1;
    const float s = absmax[block];
    typename Out::T* o = out + (i - e0);
    const int64_t n = stop - i;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = i + j;
      const uint8_t byte = packed[e >> 1];
      const uint32_t nib = (e & 1) ? (byte & 0xFu) : (byte >> 4);
      o[j] = Out::store(code[nib] * s);
    }
    i = stop;
  }
}

}  // namespace lora_cpu
