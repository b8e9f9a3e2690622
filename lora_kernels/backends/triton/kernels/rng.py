"""``@triton.jit`` mirror of :mod:`lora_kernels.backends.mask` (bit-exact; the tests compare it with the torch version).

    mix32(x) = lowbias32: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (uint32)
    c        = offset + m*K + k                                   (int64 element counter)
    h        = mix32(mix32(lo32(c) ^ key_lo) ^ hi32(c) ^ key_hi)
    keep     = h >= threshold

``key_lo``, ``key_hi`` and ``threshold`` come from the host (:func:`dropout_args`) as *signed* int32 bit patterns,
so Triton always types them ``i32`` (a value >= 2**31 would be typed ``i64`` and compile a second kernel
variant); the kernel reinterprets them as uint32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...mask import keep_threshold, launch_keys


def _as_i32(v: int) -> int:
    """The uint32 ``v`` as the int32 with the same bits."""
    return v - (1 << 32) if v >= (1 << 31) else v


def dropout_args(seed: int, p: float) -> tuple[int, int, int, float]:
    """(key_lo, key_hi, threshold, 1/(1-p)) for the kernels; keys and threshold as int32 bit patterns."""
    key_lo, key_hi = launch_keys(seed)
    return _as_i32(key_lo), _as_i32(key_hi), _as_i32(keep_threshold(p)), 1.0 / (1.0 - p)


@triton.jit
def mix32(x):
    # uint32 arithmetic wraps mod 2**32, exactly the reference's `& 0xFFFFFFFF`; `>>` is logical on unsigned.
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def keep_mask(rows, cols, K, offset, key_lo, key_hi, threshold):
    """Boolean ``[len(rows), len(cols)]`` keep-mask for global rows ``rows`` (int64) and columns ``cols``."""
    c = offset + rows[:, None].to(tl.int64) * K + cols[None, :]
    lo = (c & 0xFFFFFFFF).to(tl.uint32)
    hi = (c >> 32).to(tl.uint32)
    h = mix32(mix32(lo ^ key_lo.to(tl.uint32)) ^ hi ^ key_hi.to(tl.uint32))
    return h >= threshold.to(tl.uint32)
