"""The one timing helper every benchmark here uses.

GPU: ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed before each call so small
shapes are not flattered by a warm cache, ``.grad`` reset outside the timed region), median and 20/80
percentiles. Without triton: the same with CUDA events and a 256 MiB cache-flush buffer.

CPU: the machines are noisy (shared cores), so providers are *interleaved*: each round runs every provider once,
in a rotated order, and the statistics are taken per provider over the rounds. A slow stretch of the machine then
hits all providers alike instead of one of them.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    samples: tuple = ()  # CPU: per-round times in round order (pairs providers of one round for ratios)
    host_ms: float | None = None  # GPU: median host (launch) time of one call; >= median_ms means launch-bound


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats_of(samples_ms: list[float]) -> Stats:
    return Stats(
        statistics.median(samples_ms),
        _quantile(samples_ms, 0.2),
        _quantile(samples_ms, 0.8),
        len(samples_ms),
        tuple(samples_ms),
    )


def _reset_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def bench_gpu(fn: Callable[[], object], grad_to_none=(), warmup_ms: float = 25, rep_ms: float = 100) -> Stats:
    """Median / p20 / p80 of ``fn`` on the current CUDA device (``warmup_ms``/``rep_ms`` are milliseconds)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # do_bench: estimates the per-call time, warms up for warmup_ms, then times ~rep_ms worth of calls,
        # each between its own pair of events after an L2 flush.
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none), quantiles=[0.5, 0.2, 0.8])
        n = max(1, int(rep_ms / max(q[0], 1e-3)))
        return Stats(float(q[0]), float(q[1]), float(q[2]), n, host_ms=host_time_ms(fn, grad_to_none))
    flush = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")  # 256 MiB > any L2
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    samples = []
    for _ in range(max(5, int(rep_ms / est))):
        _reset_grads(grad_to_none)
        flush.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return dataclasses.replace(stats_of(samples), samples=(), host_ms=host_time_ms(fn, grad_to_none))


def host_time_ms(fn: Callable[[], object], grad_to_none=(), calls: int = 10) -> float:
    """Median wall time to *issue* one call on an idle device (synchronized before, not after).

    When this reaches the device time, the call is bound by Python and launch overhead, not by the kernels.
    """
    times = []
    for _ in range(calls):
        _reset_grads(grad_to_none)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


@dataclass
class CpuJob:
    """One provider's timed call and the untimed reset before it."""

    fn: Callable[[], object]
    grad_to_none: tuple = ()


def bench_cpu_interleaved(
    jobs: dict[str, CpuJob],
    *,
    warmup: int = 1,
    min_rounds: int = 5,
    max_rounds: int = 30,
    target_s: float = 20.0,
) -> dict[str, Stats]:
    """Interleaved rounds over all ``jobs``; the round count aims at ``target_s`` seconds in all (within bounds).

    Each round rotates the start provider, so no provider always runs right after the same neighbour.
    """
    names = list(jobs)
    first = {}
    for name in names:
        job = jobs[name]
        for i in range(max(1, warmup)):
            _reset_grads(job.grad_to_none)
            t0 = time.perf_counter()
            job.fn()
            if i == 0:
                first[name] = time.perf_counter() - t0
    per_round = max(sum(first.values()), 1e-6)
    rounds = max(min_rounds, min(max_rounds, int(target_s / per_round)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            job = jobs[name]
            _reset_grads(job.grad_to_none)
            t0 = time.perf_counter()
            job.fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {n: stats_of(s) for n, s in samples.items()}
