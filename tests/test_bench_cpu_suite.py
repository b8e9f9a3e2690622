"""CPU benchmark suite for pytest-benchmark (small shapes; NOT part of the default run: marked ``cpu_bench``).

    pytest -m cpu_bench tests/test_bench_cpu_suite.py --benchmark-autosave \\
        --benchmark-storage=benchmarks/results/pytest-benchmark            # save a baseline
    pytest -m cpu_bench tests/test_bench_cpu_suite.py --benchmark-compare \\
        --benchmark-storage=benchmarks/results/pytest-benchmark --benchmark-compare-fail=median:10%   # compare

Same providers and inputs as ``benchmarks/bench_lora.py`` (base = F.linear alone, peft, addmm, our torch backend),
grouped per case so ``--benchmark-group-by=group`` puts the providers of one case side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import providers as P  # noqa: E402

pytestmark = pytest.mark.cpu_bench

BUILDERS = {
    "base": P.build_base,
    "peft": P.build_peft,
    "addmm": P.build_addmm,
    "torch": P.build_backend("torch", "torch", None),
}
CASES = [P.Case(M=256, K=1024, N=1024, r=16, dropout=p) for p in (0.0, 0.1)] + [P.Case(M=16, K=1024, N=1024, r=16)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c.M}-{c.K}x{c.N}-r{c.r}-p{c.dropout:g}")
@pytest.mark.parametrize("provider", list(BUILDERS))
def test_lora_linear_cpu(benchmark, provider, case, mode):
    pytest.importorskip("pytest_benchmark")
    if provider == "peft":
        pytest.importorskip("peft")
    inp = P.make_inputs(case)
    built = BUILDERS[provider](inp, case)
    x, dy = inp.x, inp.dy
    grads = (x, *built.params)

    def reset():
        for t in grads:
            t.grad = None

    fn = (lambda: built.forward(x)) if mode == "fwd" else (lambda: built.forward(x).backward(dy))
    benchmark.group = f"{case.label()} {mode}"
    benchmark.pedantic(fn, setup=reset, rounds=15, iterations=1, warmup_rounds=2)
