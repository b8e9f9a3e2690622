"""The Triton backend's host path (issue 20): launches per call, config lookup once per shape class, and the
per-call helpers' fast paths agreeing with their general rule. No kernel runs: the one launch entry point
(launch.launch_kernel) is replaced by a counting stub, as in benchmarks/triton_host_dispatch.py."""

from __future__ import annotations

import pytest
import torch

from lora_kernels.backends.triton import configs, launch
from lora_kernels.backends.triton.plans import PLANS


def _aligned_rule(sizes, *tensors) -> bool:
    """launch.aligned's docstring, written out without its fast path."""
    if any(v % 16 for v in sizes):
        return False
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16 or any(st != 1 and size != 1 and st % 16 for st, size in zip(t.stride(), t.shape)):
            return False
    return True


def _layouts():
    base = torch.empty(4096)
    yield base[: 3 * 32].view(3, 32)  # contiguous, L % 16 == 0: the fast path
    yield base[: 3 * 40].view(3, 40)  # contiguous, L % 16 != 0
    yield base[: 1 * 40].view(1, 40)  # one row: its stride never matters
    yield base[: 2 * 3 * 32].view(2, 3, 32)  # 3-D contiguous
    yield base[: 32 * 48].view(32, 48).t()  # transposed
    yield base[: 32 * 48].view(32, 48)[:, :40]  # row stride 48 != L (a column slice)
    yield base[: 32 * 40].view(32, 40)[:, :32]  # row stride 40: not a multiple of 16
    yield base[1 : 1 + 3 * 32].view(3, 32)  # base not 16-byte aligned
    yield base[:32].expand(5, 32)  # stride 0
    yield base[:48]  # 1-D
    yield base[:40]


@pytest.mark.parametrize("t", list(_layouts()), ids=lambda t: f"{tuple(t.shape)}:{t.stride()}")
@pytest.mark.parametrize("sizes", [(), (32,), (40,)])
def test_aligned_fast_path_agrees_with_the_rule(t, sizes):
    assert launch.aligned(sizes, t) == _aligned_rule(sizes, t)
    assert launch.aligned(sizes, t, None) == _aligned_rule(sizes, t)


def test_m_bucket_is_the_power_of_two_rule():
    def rule(m):
        b = 16
        while b < m and b < 8192:
            b *= 2
        return b

    assert all(configs.m_bucket(m) == rule(m) for m in range(0, 20000))


@pytest.fixture
def stubbed(monkeypatch):
    """Launches counted, not run; configs.choose on its GPU path (per-shape-class cache, not the interpreter's)."""
    calls = []

    def stub(kernel, grid, *args, count: bool = True, **meta):
        if count:
            for c in launch._counters:
                c.count += 1
                c.kernels.append(kernel.__name__)

    real = configs.candidates

    def counting_candidates(kind, *a, **kw):
        calls.append(kind)
        return real(kind, *a, **kw)

    monkeypatch.setattr(launch, "launch_kernel", stub)
    monkeypatch.setattr(configs, "_INTERPRET", False)
    monkeypatch.setattr(configs, "candidates", counting_candidates)
    monkeypatch.setattr(configs, "_cache", {})
    return calls


# (plan, launches forward, backward, deterministic backward): NOTES.md's budget; library GEMMs are counted apart
BUDGET = {"fused": (1, 1, 2), "split": (2, 1, 2), "library": (1, 2, 3)}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_launches_per_call_and_configs_once_per_shape_class(stubbed, plan):
    mod = PLANS[plan]
    k, n, r = 32, 48, 5
    w, a, b = torch.randn(n, k), torch.randn(r, k), torch.randn(n, r)
    fwd_n, bwd_n, det_n = BUDGET[plan]
    for i, m in enumerate((20, 30, 17, 32)):  # one m_bucket (32): candidates listed on the first call only
        x, g = torch.randn(m, k), torch.randn(m, n)
        for deterministic in (False, True):
            with launch.launch_counter() as cf:
                _, xa = mod.forward(x, w, None, a, b, None, 2.0, 0.1, 1, 0)
            with launch.launch_counter() as cb:
                mod.backward(g, x, w, a, b, None, xa, 2.0, 0.1, 1, 0, True, True, True, False, False, deterministic)
            assert cf.count == fwd_n, cf.kernels
            assert cb.count == (det_n if deterministic else bwd_n), cb.kernels
        if i == 0:
            first = list(stubbed)
    assert stubbed == first, stubbed  # (deterministic is a key of its own: bwd listed once for each)
    x = torch.randn(100, k)  # another shape class: listed again
    mod.forward(x, w, None, a, b, None, 2.0, 0.1, 1, 0)
    assert len(stubbed) > len(first)
