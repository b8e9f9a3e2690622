"""Tile configurations, keyed on (M bucket, N, K, r, dtype, operand alignment) and the GPU generation.

Every entry is ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``. The launcher asks
:func:`choose` for one config per kernel and key:

* under ``TRITON_INTERPRET=1`` there is exactly one config and nothing is benchmarked. Interpreter time grows
  with the number of programs, so its blocks are large (64 x 64 tiles, K step 64);
* on a GPU the first entry of the matching table row is the default (no benchmark);
* with ``LORA_KERNELS_TRITON_AUTOTUNE=1`` every candidate of :func:`search_space` is timed once per key with
  ``triton.testing.do_bench`` (on scratch outputs, so atomics never touch real gradients), the fastest is
  cached for the process and printed as a line that can be pasted into the table below.
* :func:`override` forces a config (tests, the tuning script), also under the interpreter.

The default rows are the Triton matmul tutorial's Hopper/Ampere starting points, restricted so the extra fp32
accumulators fit in registers: the forward keeps ``[BM, R_PAD]`` next to ``[BM, BN]`` and the backward
``[BM, R_PAD]`` next to ``[BM, BK]``; for R_PAD > 64 that is another 50%+ of the accumulator, so BM drops to 64.
Rows tuned on a GPU come first; the timings that chose them are in NOTES.md ("Tiles") and benchmarks/results/.
``benchmarks/gpu_triton_tune.py`` times the search space and prints the winners to put first.

Unaligned operands (a tensor base not 16-byte aligned, or a stride or output row length that is not a multiple of
16 elements, e.g. K = 1111; Triton's JIT marks integer arguments divisible by 16 and nothing finer):
Triton cannot use 16-byte cp.async for them, so the main loop is not software-pipelined (one stage, 36 KB of
shared memory, checked with ptxas in tests/test_triton_compile.py) and the loads are element-wise. With 16-bit
activations such launches run 32 x 32 x 32 tiles, 4 warps, one stage (:data:`_UNALIGNED`): with BM >= 64 the
triton 3.6 wheel's ptxas miscompiles them (wrong dX or an illegal address on an H200; the bisection is in NOTES.md
"GPU run 4"), and 32-row tiles are the fix that needs no toolkit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator

Config = tuple[int, int, int, int, int, int]  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages

INTERPRET_CONFIG: Config = (64, 64, 64, 8, 4, 1)
AUTOTUNE_ENV = "LORA_KERNELS_TRITON_AUTOTUNE"

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
# The split plan's GEMM launch (kernels/gemm.py without FUSE_XA) holds no [BM, R_PAD] accumulator and loads no
# A tile, so the 128 x 256 tile fits (tuned on an H200: NOTES.md "Tiles"). The xa launch (kernels/xa.py; BLOCK_N
# unused) streams X once: more, smaller programs spread the dropout hash (64-row tiles, 4 warps).
_SM90[("fwd_gemm", "large")] = [
    (128, 256, 64, 8, 8, 4),
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
]
_SM90[("fwd_xa", "large")] = [(64, 16, 64, 8, 4, 4), (128, 16, 64, 8, 8, 4), (128, 16, 64, 8, 8, 3)]
# The library plan's backward epilogue (plans/library.py, PRE_GW): dX's [BM, BK] tile arrives from the library
# GEMM, GB from the xa launch; the kernel reads X, dX and G once each and adds dA/dB with atomics (one partial
# per row-tile). First row tuned on an H200 over the whole search space (NOTES.md "Tiles"); every row below passed
# the GPU tile test.
_SM90[("bwd_epi", "small")] = [(16, 64, 128, 8, 4, 2), (32, 64, 128, 8, 4, 2)]
_SM90[("bwd_epi", "large")] = [(64, 64, 128, 8, 4, 2), (128, 64, 128, 8, 8, 2), (128, 128, 64, 8, 8, 2)]


def _base_kind(kind: str) -> str:
    """The table a kind falls back to: the split plan's ``fwd_gemm`` / ``fwd_xa`` use the fused ``fwd`` rows where
    they have none of their own."""
    return "fwd" if kind.startswith("fwd") else kind


def _dedupe(rows: list[Config]) -> list[Config]:
    return list(dict.fromkeys(rows))


_SM80 = {key: _dedupe([(bm, bn, bk, g, w, min(s, 3)) for bm, bn, bk, g, w, s in rows]) for key, rows in _SM90.items()}
# unaligned launches (launch._aligned) with 16-bit activations: 32 x 32 x 32, 4 warps, 1 stage (module docstring).
_TILE32: Config = (32, 32, 32, 8, 4, 1)
_UNALIGNED = {(kind, size): [_TILE32] for kind in ("fwd", "bwd", "bwd_epi") for size in ("small", "large")}
# fp32 activations use IEEE fp32 products (no tensor cores): smaller tiles, fewer stages. fp64 uses them too
# (its tiles take twice the shared memory: 108 KB at 3 stages for the fwd (64, 64, 32) tile, checked by ptxas).
_FP32 = {
    ("fwd", "small"): [(16, 64, 32, 8, 4, 3)],
    ("fwd", "large"): [(64, 64, 32, 8, 4, 3), (128, 64, 32, 8, 4, 3)],
    ("bwd", "small"): [(16, 64, 32, 8, 4, 3)],
    ("bwd", "large"): [(64, 32, 64, 8, 4, 3), (64, 64, 32, 8, 4, 3)],
    ("bwd_epi", "small"): [(16, 64, 32, 8, 4, 2)],
    ("bwd_epi", "large"): [(64, 64, 64, 8, 4, 2), (64, 32, 64, 8, 4, 2)],
}

# sm_90 shared memory per block: 227 KB; leave 7 KB for the epilogue's buffers (B/A tiles, layout conversions;
# ptxas reports 4-8 KB of them beyond the pipeline stages in tests/test_triton_compile.py's builds).
_SMEM_BUDGET = 220 * 1024


def _stage_bytes(kind: str, cfg: Config, r_pad: int, elt: int = 2, adapter_elt: int = 4) -> int:
    bm, bn, bk = cfg[:3]
    if kind == "fwd":  # x [BM, BK] + W [BK, BN] + A [BK, R_PAD] per stage
        return (bm * bk + bk * bn) * elt + bk * r_pad * adapter_elt
    if kind == "fwd_gemm":  # x [BM, BK] + W [BK, BN]
        return (bm * bk + bk * bn) * elt
    if kind == "fwd_xa":  # x [BM, BK] + A [BK, R_PAD]
        return bm * bk * elt + bk * r_pad * adapter_elt
    if kind == "bwd_epi":  # the dB/db loop's g [BM, BN]
        return bm * bn * elt
    return (bm * bn + bn * bk) * elt + bn * r_pad * adapter_elt  # g [BM, BN] + W [BN, BK] + B [BN, R_PAD]


# What a kernel needs beyond its pipeline stages (epilogue tiles, layout conversions): ptxas reported 4-8 KB in
# tests/test_triton_compile.py's sm_90 builds.
_SMEM_RESERVE = 8 * 1024


def fit_shared_memory(kind: str, rows: list[Config], r_pad: int, max_shared: int | None, elt: int = 2) -> list[Config]:
    """``rows`` made to fit a GPU with ``max_shared`` bytes of shared memory per block (None: unknown, unchanged).

    The tables are written for sm_90 (227 KB) and sm_80 (163 KB); consumer parts have much less (sm_86 / sm_89 /
    sm_120: 99 KB), where e.g. the default 3-stage 128 x 128 x 64 forward tile (~110 KB) fails to launch with
    Triton's OutOfResources. Each row keeps as many stages as fit (at least 2, so the main loop is still
    double-buffered); a row that does not fit with 2 is dropped; if none is left, the smallest tile of the
    table, single-stage, is the answer (correct, slow). Adapters are counted as fp32 (the larger case).
    """
    if max_shared is None:
        return rows
    budget = max_shared - _SMEM_RESERVE
    out: list[Config] = []
    for bm, bn, bk, g, w, s in rows:
        per_stage = _stage_bytes(kind, (bm, bn, bk, g, w, s), r_pad, elt)
        fits = min(s, budget // per_stage)
        if fits >= 2 or (fits >= 1 and s == 1):
            out.append((bm, bn, bk, g, w, fits))
    if not out:
        smallest = min(rows, key=lambda c: _stage_bytes(kind, c, r_pad, elt))
        out = [smallest[:5] + (1,)]
    return _dedupe(out)


def search_space(kind: str, size: str, r_pad: int) -> list[Config]:
    """What autotuning times on sm_90 for 16-bit activations: BM 128/256 (16/32/64 for M <= 64), BN 128/256 (64
    too in the backward, whose N step is BN), BK 64/128, 4/8 warps, 3/4/5 stages, GROUP_M 8, bounded by

    * registers: the fp32 accumulator tile (BM x BN forward, BM x BK backward) over the CTA's threads must stay
      <= 128 per thread (plus R_PAD columns for XA/GB), so 256-wide tiles need 8 warps and 256 x 256 is out;
    * shared memory: stages x stage bytes <= 220 KB.

    The memory-bound ``fwd_xa`` (XA, GB) and ``bwd_epi`` launches search BM 32/64/128, BK up to 256, 2-8 warps,
    2-4 stages instead (more programs per SM; see the comment in the body).

    The defaults (``candidates``) come first so an autotuned run can only match or beat them. At most 16 per
    kind for M > 64 and 8 for M <= 64 (decode is host-bound, so tiles matter little there): each candidate is one
    compile (~1-3 s) per key.
    """
    base = _base_kind(kind)
    default = _SM90.get((kind, size)) or _SM90[(base, size)]
    if size == "small":
        bms, bns, bks = (16, 32, 64), (64, 128), (128, 256)
        warps, stages = (4,), (3, 4, 5)
    elif kind in ("fwd_xa", "bwd_epi"):
        # memory-bound launches with one program per row-tile (XA, GB) or per [BM, BK] tile (the epilogue): at
        # M=8192 a 128-row XA grid is 64 programs on 132 SMs, so smaller row tiles are in the space too
        bms, bns, bks = (32, 64, 128), (16,) if kind == "fwd_xa" else (64, 128), (64, 128, 256)
        warps, stages = (2, 4, 8), (2, 3, 4)
    else:
        bms, bns, bks = (128, 256), ((128, 256) if base == "fwd" else (64, 128)), (64, 128)
        warps, stages = (4, 8), (3, 4, 5)
    out: list[Config] = list(default)
    for bm in bms:
        for bn in bns:
            for bk in bks:
                acc = (bm if kind == "fwd_xa" else bm * (bn if base == "fwd" else bk)) + bm * r_pad
                for w in warps:
                    if acc / (32 * w) > 128 + 16:  # fp32 accumulator registers per thread
                        continue
                    for s in stages:
                        cfg = (bm, bn, bk, 8, w, s)
                        if cfg in out or s * _stage_bytes(kind, cfg, r_pad) > _SMEM_BUDGET:
                            continue
                        out.append(cfg)
    # keep the defaults plus an even spread of the rest, at most 16
    rest = out[len(default) :]
    limit = (16 if size == "large" else 8) - len(default)
    if len(rest) > limit:
        step = len(rest) / limit
        rest = [rest[int(i * step)] for i in range(limit)]
    return list(default) + rest


def xa_only(rows: list[Config]) -> list[Config]:
    """Candidates for the xa launch (kernels/xa.py): its grid has one program per row-tile and it never touches W,
    so BLOCK_N does not matter; fixing it to 16 dedupes the list, and at most 6 are kept (it streams X once with
    an [BM, R_PAD] accumulator: memory-bound)."""
    out: list[Config] = []
    for bm, _bn, bk, g, w, st in rows:
        if (bm, 16, bk, g, w, st) not in out:
            out.append((bm, 16, bk, g, w, st))
    return out[:6]


# TRITON_INTERPRET must be set before any kernel is decorated (tests/conftest.py), so it cannot change later.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRET


def autotuning() -> bool:
    return os.environ.get(AUTOTUNE_ENV) == "1"


def m_bucket(m: int) -> int:
    """Powers of two up to 8192: configs change with the number of row-tiles, not with every M."""
    return 16 if m <= 16 else 8192 if m >= 8192 else 1 << (m - 1).bit_length()


def candidates(
    kind: str,
    m: int,
    r_pad: int,
    dtype_name: str,
    capability: tuple[int, int],
    aligned: bool = True,
    max_shared: int | None = None,
) -> list[Config]:
    """Tile candidates, the default first. ``kind``: ``fwd`` (fused forward), ``fwd_gemm`` / ``fwd_xa`` (the
    split plan's GEMM and XA-only launches; they fall back to the ``fwd`` rows where no row of their own exists,
    ``fwd_xa`` then with BLOCK_N fixed to 16), ``bwd`` (the one-launch backward), ``bwd_epi`` (the library plan's
    backward epilogue). ``max_shared``: the device's shared memory per block
    (:func:`fit_shared_memory`)."""
    size = "small" if m <= 64 else "large"
    base = _base_kind(kind)
    if dtype_name in ("float32", "float64"):
        rows = _FP32[(base, size)]
    elif not aligned:
        rows = _UNALIGNED[(base, size)]
        _say_unaligned(dtype_name)
    elif capability >= (9, 0) and autotuning():
        rows = search_space(kind, size, r_pad)
    else:
        table = _SM90 if capability >= (9, 0) else _SM80
        rows = table.get((kind, size)) or table[(base, size)]
    if kind == "fwd_xa":
        rows = xa_only(rows)
    if r_pad > 64:
        rows = [c for c in rows if c[0] <= 64] or [(64,) + c[1:] for c in rows[:1]]
    elt = 8 if dtype_name == "float64" else 4 if dtype_name == "float32" else 2
    return fit_shared_memory(kind, rows, r_pad, max_shared, elt)


_unaligned_said: set[str] = set()


def _say_unaligned(dtype_name: str) -> None:
    """The slow tiles are not taken silently: one log line per dtype (candidates runs on a config-cache miss)."""
    if dtype_name not in _unaligned_said:
        _unaligned_said.add(dtype_name)
        logging.getLogger("lora_kernels").warning(
            "lora_kernels.backends.triton: %s operands whose sizes/strides are not multiples of 16 elements (or a base not "
            "16-byte aligned) run on 32x32x32 single-stage tiles (slower; the larger tiles miscompile there, "
            "lora_kernels/backends/triton/NOTES.md 'GPU run 4'): in/out features that are multiples of 16 get the fast tiles",
            dtype_name,
        )


_cache: dict[tuple, Config] = {}
_override: dict[str, Config] = {}
tuning_log: list[dict] = []  # one entry per tuned key: kind, key, best, times (ms) per candidate
tune_deadline: float | None = None  # time.perf_counter() after which tuning stops timing new candidates


@contextlib.contextmanager
def override(**cfgs: Config) -> Iterator[None]:
    """``with override(fwd=cfg, bwd=cfg): ...`` forces tiles, also under the interpreter.

    Keys are kernel kinds or their prefixes (``fwd`` covers the fused ``fwd0`` and the split ``fwd2``/``fwd1``).
    The CPU tests use it to run the exact tiles a GPU table picks (block sizes and R_PAD decide the masks and
    the pointer arithmetic; num_warps/num_stages do not exist in the interpreter).
    """
    saved = dict(_override)
    _override.update(cfgs)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def choose(kind: str, key: tuple, cands: Callable[[], list[Config]], bench: Callable[[Config], None] | None) -> Config:
    """The config for ``kind`` at ``key`` (cached). ``cands()`` lists the candidates (called on a cache miss
    only); ``bench(cfg)`` runs one launch on scratch outputs."""
    if _override:
        for k in (kind, kind[:3]):
            if k in _override:
                return _override[k]
    if interpreting():
        return INTERPRET_CONFIG
    full_key = (kind, *key)
    cfg = _cache.get(full_key)
    if cfg is not None:
        return cfg
    rows = cands()
    best = rows[0]
    if bench is not None and len(rows) > 1 and autotuning():
        from triton.compiler.errors import CompileTimeAssertionFailure
        from triton.runtime.errors import OutOfResources, PTXASError
        from triton.testing import do_bench

        times = {}
        for c in rows:
            if times and tune_deadline is not None and time.perf_counter() > tune_deadline:
                print(f"lora_kernels.backends.triton autotune: {kind} tuning budget spent after {len(times)}/{len(rows)}",
                      file=sys.stderr)  # fmt: skip
                break
            try:
                times[c] = do_bench(lambda c=c: bench(c), warmup=5, rep=20)
            except (OutOfResources, CompileTimeAssertionFailure, PTXASError) as e:
                # this tile does not fit this GPU (shared memory / registers) or ptxas rejects it: not a candidate
                # here (the same three errors triton.autotune skips); said, not swallowed
                print(f"lora_kernels.backends.triton autotune: {kind} {c} skipped: {type(e).__name__}", file=sys.stderr)
        if times:
            best = min(times, key=times.get)
            tuning_log.append({"kind": kind, "key": key, "best": best, "times": times})
            print(
                f"lora_kernels.backends.triton autotune: {kind} key={key} best={best} {times[best]:.4f} ms "
                f"(default {rows[0]} {times.get(rows[0], float('nan')):.4f} ms, {len(times)}/{len(rows)} ran)",
                file=sys.stderr,
            )
    _cache[full_key] = best
    return best
