"""Tile configurations, keyed on (M bucket, N, K, r, dtype) and the GPU generation.

Every entry is ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``. The launcher asks
:func:`choose` for one config per kernel and key:

* under ``TRITON_INTERPRET=1`` there is exactly one config and nothing is benchmarked. Interpreter time grows
  with the number of programs, so its blocks are large (64 x 64 tiles, K step 64);
* on a GPU the first candidate of the matching table row is the default (no benchmark: compiling 4 candidates
  per kernel, dtype and shape costs one compile each: 4-15 s per variant for the ptxas step on this 2-core
  CI machine (tests/test_triton_compile.py), unmeasured on the GPU host);
* with ``LORA_KERNELS_TRITON_AUTOTUNE=1`` all candidates of the row are timed once per key with
  ``triton.testing.do_bench`` (on scratch outputs, so atomics never touch real gradients) and the fastest is
  cached for the process.

The tables are starting points from the Triton matmul tutorial's Hopper/Ampere configs, restricted so that the
extra fp32 accumulators fit in registers: the forward keeps ``[BM, R_PAD]`` next to ``[BM, BN]`` and the
backward ``[BM, R_PAD]`` next to ``[BM, BK]``; for R_PAD > 64 that is another 50%+ of the accumulator, so
BM drops to 64. Until tuned on the GPU (NOTES.md), they are not measured claims.
"""

from __future__ import annotations

import os
from collections.abc import Callable

Config = tuple[int, int, int, int, int, int]  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages

INTERPRET_CONFIG: Config = (64, 64, 64, 8, 4, 1)

# forward tile = [BM, BN] of Y, K step BK; backward tile = [BM, BK] of dX, N step BN.
_SM90 = {
    ("fwd", "small"): [(16, 64, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4), (16, 128, 128, 8, 4, 4)],
    ("fwd", "large"): [
        (128, 128, 64, 8, 8, 3),
        (128, 256, 64, 8, 8, 3),
        (128, 128, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
    ],
    ("bwd", "small"): [(16, 64, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4)],
    ("bwd", "large"): [
        (128, 64, 128, 8, 8, 3),
        (128, 64, 64, 8, 4, 4),
        (64, 64, 128, 8, 4, 4),
        (128, 128, 128, 8, 8, 3),
    ],
}
_SM80 = {key: [(bm, bn, bk, g, w, min(s, 3)) for bm, bn, bk, g, w, s in rows] for key, rows in _SM90.items()}
# fp32 activations use IEEE fp32 products (no tensor cores): smaller tiles, fewer stages. fp64 uses them too
# (its tiles take twice the shared memory: 108 KB at 3 stages for the fwd (64, 64, 32) tile, checked by ptxas).
_FP32 = {
    ("fwd", "small"): [(16, 64, 32, 8, 4, 3)],
    ("fwd", "large"): [(64, 64, 32, 8, 4, 3), (128, 64, 32, 8, 4, 3)],
    ("bwd", "small"): [(16, 64, 32, 8, 4, 3)],
    ("bwd", "large"): [(64, 32, 64, 8, 4, 3), (64, 64, 32, 8, 4, 3)],
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def m_bucket(m: int) -> int:
    """Powers of two up to 8192: configs change with the number of row-tiles, not with every M."""
    b = 16
    while b < m and b < 8192:
        b *= 2
    return b


def candidates(kind: str, m: int, r_pad: int, dtype_name: str, capability: tuple[int, int]) -> list[Config]:
    size = "small" if m <= 64 else "large"
    if dtype_name in ("float32", "float64"):
        rows = _FP32[(kind, size)]
    else:
        rows = (_SM90 if capability >= (9, 0) else _SM80)[(kind, size)]
    if r_pad > 64:
        rows = [c for c in rows if c[0] <= 64] or [(64,) + c[1:] for c in rows[:1]]
    return rows


_cache: dict[tuple, Config] = {}


def choose(kind: str, key: tuple, cands: list[Config], bench: Callable[[Config], None] | None) -> Config:
    """The config for ``kind`` at ``key`` (cached). ``bench(cfg)`` runs one launch on scratch outputs."""
    if interpreting():
        return INTERPRET_CONFIG
    full_key = (kind, *key)
    if full_key in _cache:
        return _cache[full_key]
    best = cands[0]
    if bench is not None and len(cands) > 1 and os.environ.get("LORA_KERNELS_TRITON_AUTOTUNE") == "1":
        import triton
        from triton.testing import do_bench

        times = {}
        for cfg in cands:
            try:
                times[cfg] = do_bench(lambda cfg=cfg: bench(cfg), warmup=5, rep=20)
            except triton.runtime.errors.OutOfResources:
                continue  # this tile does not fit this GPU's shared memory / registers: not a candidate here
        if times:
            best = min(times, key=times.get)
    _cache[full_key] = best
    return best
