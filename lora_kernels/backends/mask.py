"""The dropout mask: one counter-based hash shared by every backend.

DESIGN.md requires the mask to be a pure function of ``(seed, offset, m*K + k)`` so that the forward and
backward kernels (different tilings), the Triton and CUDA kernels (different again) and the torch path all
draw the same mask, and the backward pass can regenerate it instead of saving an ``M x K`` tensor.

The function, written once here and mirrored bit-for-bit in ``lora_kernels/backends/triton/_rng.py`` and
``csrc/lora_rng.cuh``::

    mix32(x)  = lowbias32 (C. Wellons' 2-multiply integer hash, public-domain constants):
                x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (mod 2**32)
    key_lo    = mix32((seed       & 0xFFFFFFFF) ^ 0x243F6A88)      # per launch, scalar
    key_hi    = mix32(((seed>>32) & 0xFFFFFFFF) ^ 0x85A308D3)
    c         = offset + m*K + k                                   # 64-bit element counter
    h         = mix32(mix32((c & 0xFFFFFFFF) ^ key_lo) ^ (c >> 32) ^ key_hi)
    keep      = h >= threshold,   threshold = min(round(p * 2**32), 2**32 - 1)
    Z         = keep / (1 - p)

Why not Philox (``tl.rand``, curand)? Philox-4x32-10 costs ~10 rounds of 32x32->64 multiplies per draw; the
one-launch forward regenerates the mask once per N-tile column, so the RNG runs ``N/BN`` times per element.
Two ``mix32`` calls are ~12 integer ops, and every backend (including this vectorised torch version) computes
exactly the same bits, which is what the tests need. Quality: lowbias32 has a measured avalanche bias of
~0.17 (Wellons, "Prospecting for Hash Functions"); the tests check the keep-rate against a binomial bound.
"""

from __future__ import annotations

import threading

import torch

M32 = 0xFFFFFFFF
_MIX_C1 = 0x7FEB352D
_MIX_C2 = 0x846CA68B
_KEY_SALT_LO = 0x243F6A88
_KEY_SALT_HI = 0x85A308D3
SEED_MAX = 2**63 - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32) without int64 overflow (split c into 16-bit halves)."""
    lo = x * (c & 0xFFFF)  # < 2**48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16  # < 2**32
    return (lo + hi) & M32


def mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_C2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * _MIX_C1) & M32
    x ^= x >> 15
    x = (x * _MIX_C2) & M32
    return x ^ (x >> 16)


def launch_keys(seed: int) -> tuple[int, int]:
    """The two per-launch 32-bit keys derived from a 63-bit seed (host side; kernels may recompute them)."""
    return mix32_int((seed & M32) ^ _KEY_SALT_LO), mix32_int(((seed >> 32) & M32) ^ _KEY_SALT_HI)


def keep_threshold(p: float) -> int:
    """Keep an element when its 32-bit hash is >= this value: P(keep) = 1 - threshold / 2**32 ~= 1 - p."""
    return min(int(round(p * 2**32)), M32)


# Rows of the mask hashed per chunk: 64K int64 counters (512 KiB) plus one scratch buffer stay in L2, and peak
# memory stays O(chunk) instead of several M x K int64 temporaries (2 GiB at M=8192, K=4096 before chunking).
_CHUNK_ELEMS = 1 << 16


def _mix32_inplace(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``mix32`` in place on int64 values in [0, 2**32); ``tmp`` is scratch of the same shape.

    ``x * C`` may exceed 2**63 and wrap in int64; the low 32 bits, which are all we keep, are exact either way
    (two's-complement multiplication), and test_rng checks this against the pure-Python version.
    """
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_MIX_C1).bitwise_and_(M32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_MIX_C2).bitwise_and_(M32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def dropout_keep_mask(seed: int, offset: int, m: int, k: int, p: float, device=None) -> torch.Tensor:
    """Boolean ``[m, k]`` keep-mask for rows ``0..m`` of an ``[m, k]`` input; True = kept.

    ``offset`` is added to the flat element index ``row*k + col``; the kernels use the same convention.
    """
    out = torch.empty(m * k, dtype=torch.bool, device=device)
    key_lo, key_hi = launch_keys(seed)
    thr = keep_threshold(p)
    n = m * k
    chunk = min(_CHUNK_ELEMS if out.device.type == "cpu" else 1 << 24, max(n, 1))
    idx = torch.empty(chunk, dtype=torch.int64, device=out.device)
    tmp = torch.empty_like(idx)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        h, t = idx[:c], tmp[:c]
        torch.arange(offset + start, offset + start + c, dtype=torch.int64, device=out.device, out=h)
        torch.bitwise_right_shift(h, 32, out=t)  # hi32(counter), kept for the second round
        hi = t.clone() if c else t
        h.bitwise_and_(M32).bitwise_xor_(key_lo)
        _mix32_inplace(h, t)
        h.bitwise_xor_(hi).bitwise_xor_(key_hi)
        _mix32_inplace(h, t)
        torch.ge(h, thr, out=out[start : start + c])
    return out.view(m, k)


def _s32(v: int) -> int:
    """The uint32 ``v`` as the int32 with the same bits (torch has no shifts or compares for uint32)."""
    return v - (1 << 32) if v >= (1 << 31) else v


_S16 = 0xFFFF
_INT32_MIN = -(1 << 31)
_iota_cache: dict[torch.device, torch.Tensor] = {}


def _iota32(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` in int32, cached per device (grown on demand): the counters' low-word increments."""
    if torch.compiler.is_compiling():  # no tensor from inside a traced graph may land in the cache
        return torch.arange(n, dtype=torch.int32, device=device)
    t = _iota_cache.get(device)
    if t is None or t.numel() < n:
        t = _iota_cache[device] = torch.arange(max(n, 1 << 12), dtype=torch.int32, device=device)
    return t[:n]


def _mix32_i32(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``mix32`` in place on int32 tensors holding uint32 bits: multiplication wraps mod 2**32 as in uint32, and
    a logical shift is the arithmetic one with the sign-extended bits masked off."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(_S16))
    x.mul_(_s32(_MIX_C1))
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp).bitwise_and_(0x1FFFF))
    x.mul_(_s32(_MIX_C2))
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(_S16))


def keep_mask_fast(seed: int, offset: int, m: int, k: int, p: float, device=None) -> torch.Tensor:
    """:func:`dropout_keep_mask` computed with half as many bytes per op: the same bits (tests/test_mask_native.py).

    The counter's high word is constant between wraps of its low word, so each segment hashes int32 counters
    ``lo + j``; the unsigned compare ``h >= threshold`` is a signed compare after flipping both sign bits.
    """
    out = torch.empty(m * k, dtype=torch.bool, device=device)
    key_lo, key_hi = launch_keys(seed)
    thr = _s32(keep_threshold(p) ^ 0x80000000)
    n = m * k
    dev = out.device
    chunk = min(_CHUNK_ELEMS if dev.type == "cpu" else 1 << 24, max(n, 1))
    h_buf = torch.empty(chunk, dtype=torch.int32, device=dev)
    t_buf = torch.empty_like(h_buf)
    pos = 0
    while pos < n:
        c = offset + pos
        lo = c & M32
        seg = min(n - pos, chunk, (1 << 32) - lo)  # no low-word wrap inside a segment
        h, t = h_buf[:seg], t_buf[:seg]
        torch.add(_iota32(seg, dev), _s32(lo), out=h).bitwise_xor_(_s32(key_lo))
        _mix32_i32(h, t)
        h.bitwise_xor_(_s32(((c >> 32) & M32) ^ key_hi))
        _mix32_i32(h, t)
        torch.ge(h.bitwise_xor_(_INT32_MIN), thr, out=out[pos : pos + seg])
        pos += seg
    return out.view(m, k)


def apply_dropout(
    x2d: torch.Tensor, seed: int, offset: int, p: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``x2d * Z`` for a 2-D ``[M, K]`` tensor (a new tensor; ``x2d`` is not modified).

    ``keep`` may pass a mask already built by :func:`dropout_keep_mask` for the same (seed, offset, shape).
    """
    m, k = x2d.shape
    if keep is None:
        keep = dropout_keep_mask(seed, offset, m, k, p, device=x2d.device)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))


def draw_seed(device: torch.device | None = None) -> int:
    """A fresh seed from torch's CPU default generator.

    Drawing from the CPU generator (never the CUDA one) costs no device sync, follows ``torch.manual_seed``,
    and is restored by ``torch.utils.checkpoint`` (preserve_rng_state), so a recomputed forward draws the
    same mask.
    """
    if torch.compiler.is_compiling():  # no state touched from inside a traced graph
        return int(torch.randint(0, SEED_MAX, (1,), dtype=torch.int64).item())
    buf = getattr(_seed_buf, "t", None)
    if buf is None:
        buf = _seed_buf.t = torch.empty((), dtype=torch.int64)
    # random_ on a kept 0-dim tensor draws the same value as torch.randint(0, SEED_MAX, (1,)) from the same
    # generator state (tests/test_mask_native.py), without allocating a tensor per call; one buffer per thread.
    return buf.random_(0, SEED_MAX).item()


_seed_buf = threading.local()
