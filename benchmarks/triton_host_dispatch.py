"""Host (Python) time per call of the Triton backend's dispatch, on the CPU, with every Triton launch stubbed out.

    python -m benchmarks.triton_host_dispatch                       # table on stdout
    python -m benchmarks.triton_host_dispatch --csv out.csv --label before

What it isolates: everything lora_kernels does on the host for one call except the Triton launches themselves
(``launch.launch_kernel`` is replaced by a stub that counts the launch and returns; the library GEMMs, allocations
and autograd run for real on tiny CPU tensors, so their dispatch cost is in the figure, their math ~nothing).
Config lookup runs as on a GPU (``configs.choose`` with its per-shape-class cache, not the interpreter's fixed
config). What it cannot see: Triton's own launcher (``JITFunction.run``: argument binding, specialisation key,
driver launch), which only a GPU run measures (benchmarks/gpu_plans.py, "host per call").

Levels, each per call (median over interleaved rounds of the per-round mean, microseconds):

* ``lora_linear``: the user's call (validation, backend resolution, the op);
* ``op``: ``TRITON_OP.apply`` with the plan given (the backend's own path: op contract + plan);
* ``plan``: the plan module's ``forward`` / ``backward`` called directly;
* ``F.linear``: torch's own frozen linear at the same sizes (dispatch + autograd floor, no LoRA).

Modes ``fwd`` (forward with autograd recording) and ``fwd+bwd`` (forward then ``backward``); plans ``fused`` and
``library``; also the launches per call (Triton launches / library GEMMs) the stub counted. Last, rows
``triton binder <kernel>``: the part of Triton's launcher that can be timed without a GPU (argument binding and
specialisation + cache key, per launch, with the plans' real arguments): what a launch through a compiled kernel
bound once would skip. And rows ``helper <name>``: the per-call helpers alone (best of repeats), which is where a
change of a few microseconds shows above the noise of whole calls.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["TRITON_INTERPRET"] = "1"  # the triton backend accepts CPU tensors; nothing is interpreted (stub)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

M_SIZES = (16, 1024)  # decode and training row counts: a different config class (m_bucket), same host path
K = N = 32  # tiny: the library GEMMs and allocations cost their dispatch, not their math
R = 8


def _stub_launches():
    """Replace the one launch entry point with a counting no-op and let ``configs.choose`` run its GPU path."""
    from lora_kernels.backends.triton import configs, launch

    def launch_stub(kernel, grid, *args, count: bool = True, **meta) -> None:
        if count:
            for c in launch._counters:
                c.count += 1
                c.kernels.append(kernel.__name__)

    launch.launch_kernel = launch_stub
    configs._INTERPRET = False


def _calls(m: int, plan: str, p: float):
    """``{(level, mode): fn}`` for one row count and plan."""
    from lora_kernels import lora_linear
    from lora_kernels.backends.base import LoRAOpts
    from lora_kernels.backends.triton import forward_plan
    from lora_kernels.backends.triton.ops import TRITON_OP
    from lora_kernels.backends.triton.plans import PLANS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, K, generator=g).requires_grad_(True)
    w = torch.randn(N, K, generator=g) * K**-0.5
    a = (torch.randn(R, K, generator=g) * K**-0.5).requires_grad_(True)
    b = (torch.randn(N, R, generator=g) * R**-0.5).requires_grad_(True)
    dy = torch.randn(m, N, generator=g)
    opts = LoRAOpts(2.0, p, seed=1)
    mod = PLANS[plan]

    def user():
        with forward_plan(plan):
            return lora_linear(x, w, None, a, b, 2.0, p, True, seed=1, backend="triton")

    def op():
        return TRITON_OP.apply(x, w, None, a, b, None, opts, plan)

    @torch.no_grad()  # as inside the op's autograd.Function
    def plan_fwd():
        return mod.forward(x, w, None, a, b, None, 2.0, p, 1, 0)

    xa = plan_fwd()[1]

    @torch.no_grad()
    def plan_fwdbwd():
        mod.forward(x, w, None, a, b, None, 2.0, p, 1, 0)
        return mod.backward(dy, x, w, a, b, None, xa, 2.0, p, 1, 0, True, True, True, False, False, False)

    def base():
        return F.linear(x, w)

    def fb(fn):
        def run():
            fn().backward(dy)

        return run

    return {
        ("lora_linear", "fwd"): user, ("lora_linear", "fwd+bwd"): fb(user),
        ("op", "fwd"): op, ("op", "fwd+bwd"): fb(op),
        ("plan", "fwd"): plan_fwd, ("plan", "fwd+bwd"): plan_fwdbwd,
        ("F.linear", "fwd"): base, ("F.linear", "fwd+bwd"): fb(base),
    }, (x, a, b)  # fmt: skip


def _launches(fn) -> tuple[int, int]:
    from lora_kernels.backends.triton.launch import launch_counter

    with launch_counter() as c:
        fn()
    return c.count, c.library


def measure(rounds: int, calls: int, p: float) -> list[dict]:
    _stub_launches()
    jobs = []
    for m in M_SIZES:
        for plan in ("fused", "library"):
            fns, params = _calls(m, plan, p)
            for (level, mode), fn in fns.items():
                if level == "F.linear" and plan != "fused":
                    continue  # the same for both plans
                fn()  # warm: config cache, allocator
                jobs.append((m, plan if level != "F.linear" else "-", level, mode, fn, params))
    samples: dict[int, list[float]] = {i: [] for i in range(len(jobs))}
    for _ in range(rounds):  # interleaved: every job once per round, so load changes hit all of them alike
        for i, (*_, fn, params) in enumerate(jobs):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
                for t in params:
                    t.grad = None
            samples[i].append((time.perf_counter() - t0) / calls * 1e6)
    rows = []
    for i, (m, plan, level, mode, fn, _) in enumerate(jobs):
        launches, library = _launches(fn)
        us = samples[i]
        rows.append(dict(M=m, plan=plan, level=level, mode=mode, p=p, us_median=round(statistics.median(us), 2),
                         us_min=round(min(us), 2), triton_launches=launches, library_calls=library))  # fmt: skip
    return rows


def triton_binder_rows(p: float) -> list[dict]:
    """Triton's own per-launch host step that runs before the driver launch, measured on the CPU: the generated
    argument binder (specialisation of every argument) and the compiled-kernel cache key, for each kernel the
    fused and library plans launch, with their real arguments (an sm_90 backend object; no GPU needed). This is
    the work a launch through a bound compiled kernel would skip. Empty when this Triton has no such internals."""
    import timeit

    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature
    except ImportError as e:
        print(f"triton binder: not measured ({e})")
        return []
    from lora_kernels.backends.triton import launch
    from lora_kernels.backends.triton.kernels import backward, gemm, xa

    jit = {"lora_fwd_kernel": gemm, "lora_xa_kernel": xa, "lora_bwd_kernel": backward}
    captured: dict[str, tuple] = {}

    def grab(kernel, grid, *args, count: bool = True, **meta) -> None:
        captured.setdefault(kernel.__name__, (args, meta))

    saved, launch.launch_kernel = launch.launch_kernel, grab
    try:
        for plan in ("fused", "library"):
            fns, _ = _calls(1024, plan, p)
            fns[("plan", "fwd+bwd")]()
    finally:
        launch.launch_kernel = saved
    backend, rows = CUDABackend(GPUTarget("cuda", 90, 32)), []
    for name, (args, meta) in sorted(captured.items()):
        kernel = getattr(jit[name], name)
        if not hasattr(kernel, "signature"):  # TRITON_INTERPRET=1 wrapped it: the JITFunction a GPU would launch
            kernel = JITFunction(kernel.fn)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kw = dict(meta, debug=False, instrumentation_mode="", fpsan_homomorphic_casts=False)
        cache: dict = {}

        def call(binder=binder, args=args, kw=kw, cache=cache):
            _, spec, opts = binder(*args, **kw)
            return compute_cache_key(cache, spec, opts)

        call()
        us = [t / 2000 * 1e6 for t in timeit.repeat(call, number=2000, repeat=7)]
        rows.append(dict(M=1024, plan="-", level=f"triton binder {name}", mode="per launch", p=p,
                         us_median=round(statistics.median(us), 2), us_min=round(min(us), 2), triton_launches=1,
                         library_calls=0))  # fmt: skip
    return rows


def helper_rows(p: float) -> list[dict]:
    """The per-call helpers the plans run on every call, timed alone on the plans' real arguments (best of
    repeats: robust to load, unlike the whole-call figures): what a change to one of them moves."""
    import timeit

    from lora_kernels.backends.triton import configs, launch

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, K, generator=g), torch.randn(N, K, generator=g)
    a, b, dy = torch.randn(R, K, generator=g), torch.randn(N, R, generator=g), torch.randn(1024, N, generator=g)
    cases = {
        "aligned (forward args)": lambda: launch.aligned((N,), x, w, a, b, None),
        "aligned (backward args)": lambda: launch.aligned((K,), dy, x, w, a, b, None),
        "m_bucket(1024)": lambda: configs.m_bucket(1024),
        "rows_view(x)": lambda: launch.rows_view(x),
    }
    rows = []
    for name, fn in cases.items():
        us = [t / 20000 * 1e6 for t in timeit.repeat(fn, number=20000, repeat=7)]
        rows.append(dict(M=1024, plan="-", level=f"helper {name}", mode="per call", p=p,
                         us_median=round(statistics.median(us), 3), us_min=round(min(us), 3), triton_launches=0,
                         library_calls=0))  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--csv", default=None, help="append rows here (header written when the file is new)")
    ap.add_argument("--label", default="", help="e.g. before / after: recorded in the CSV")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.rounds, args.calls, args.p)
    rows += helper_rows(args.p) + triton_binder_rows(args.p)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = os.getloadavg()[0]
    print(f"| M | plan | level | mode | us/call (median) | min | triton launches | library calls |  (load {load:.2f})")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['M']} | {r['plan']} | {r['level']} | {r['mode']} | {r['us_median']:.1f} | {r['us_min']:.1f} | "
              f"{r['triton_launches']} | {r['library_calls']} |")  # fmt: skip
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["label", "commit", "load1", *rows[0]])
            if new:
                w.writeheader()
            for r in rows:
                w.writerow(dict(label=args.label, commit=commit, load1=round(load, 2), **r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
