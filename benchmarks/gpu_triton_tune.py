"""Autotune the Triton LoRA kernels on a GPU, print the winners, time fused vs split, check against torch.

    python benchmarks/gpu_triton_tune.py [--budget 70] [--m 16 8192] [--p 0 0.1]

For M in {16, 8192}, 4096 -> 4096, r=16, bf16 activations, fp32 adapters, p in {0, 0.1}:

1. autotune every Triton kernel the auto plan launches (M=8192: fwd2/fwd1 = the split forward's XA and GEMM
   launches; M=16: fwd0 = the fused forward; bwd = the backward) over configs.search_space, most important keys
   first (M=8192 p=0, then p=0.1, then M=16, then the fused forward at M=8192 for the fused-vs-split verdict);
   once ``--budget`` seconds are spent (checked between candidates) the key being tuned keeps its best so far and
   the remaining keys keep their default tiles, listed as not tuned.
   Each winner is printed as a line for configs.py's table;
2. time (triton.testing.do_bench medians, ms) base F.linear, the fused and the split forward, the backward;
3. check y and every gradient against the torch backend with the repository's rule (tests/helpers.py
   assert_close_to_oracle: <= 2x torch's own error vs an fp64 evaluation, plus 1e-6 relative atol).
   Exit status 1 on any mismatch, 2 if CUDA/triton is missing.

Sized for < 120 s on an H200: 70 s of tuning (compile ~1-3 s per candidate, ~40 candidates at M=8192 p=0), then
the untuned variants' compiles, the timings and the fp64 checks (~20-30 s, estimated: not yet run on a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("LORA_KERNELS_TRITON_AUTOTUNE", "1")  # before lora_kernels.backends.triton reads it (per call)
if "--dry-run" in sys.argv or "--host-time" in sys.argv:  # CPU modes (see main's options): nothing to tune
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LORA_KERNELS_TRITON_AUTOTUNE"] = "0"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=70.0, help="seconds of autotuning before falling back to defaults")
    ap.add_argument("--m", type=int, nargs="+", default=[8192, 16])
    ap.add_argument("--p", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dry-run", action="store_true", help="CPU + interpreter, M in {16, 80}, K=N=64, r=4 (no tuning)")
    ap.add_argument("--host-time", action="store_true", help="CPU: per-call host time up to the Triton launch")
    args = ap.parse_args()

    import torch

    if args.host_time:
        return host_time()

    if args.dry_run:
        args.m, args.k, args.n, args.r = [80, 16], 64, 72, 4
    elif not torch.cuda.is_available():
        print("gpu_triton_tune: no CUDA device", file=sys.stderr)
        return 2
    try:
        import triton
        from triton.testing import do_bench

        if args.dry_run:

            def do_bench(fn, warmup=0, rep=0):
                t0 = time.perf_counter()
                fn()
                return (time.perf_counter() - t0) * 1e3

    except ImportError:
        print("gpu_triton_tune: triton is not importable", file=sys.stderr)
        return 2

    import lora_kernels.backends.triton as lkt
    from lora_kernels.backends.triton import configs
    from lora_kernels.functional import lora_linear
    from lora_kernels.testing import max_abs_err, oracle_check

    t_start = time.perf_counter()
    configs.tune_deadline = t_start + args.budget  # checked between candidates inside configs.choose
    dev = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU dry run" if args.dry_run else f"{torch.cuda.get_device_name()} cc{torch.cuda.get_device_capability()}"
    print(
        f"gpu_triton_tune: {name} "
        f"torch {torch.__version__} triton {triton.__version__} K={args.k} N={args.n} r={args.r} bf16/fp32-adapters "
        f"budget {args.budget:.0f} s"
    )
    k, n, r, scale = args.k, args.n, args.r, 2.0
    gen = torch.Generator(device="cpu").manual_seed(0)

    def inputs(m):
        rnd = lambda *s, std=1.0, dt=torch.bfloat16: (torch.randn(*s, generator=gen) * std).to(dev, dt)
        x = rnd(m, k)
        w = rnd(n, k, std=k**-0.5)
        a = rnd(r, k, std=k**-0.5, dt=torch.float32)
        b = rnd(n, r, std=r**-0.5, dt=torch.float32)
        g = rnd(m, n)
        return x, w, a, b, g

    def run(backend, x, w, a, b, g, p, plan=None, grads=True):
        x = x.detach().requires_grad_(grads)
        a = a.detach().requires_grad_(grads)
        b = b.detach().requires_grad_(grads)
        if plan is not None:
            lkt.set_forward_plan(plan)
        try:
            y = lora_linear(x, w, None, a, b, scale, p, seed=11, backend=backend)
        finally:
            lkt.set_forward_plan(None)
        if not grads:
            return {"y": y}
        dx, da, db = torch.autograd.grad(y, (x, a, b), g)
        return {"y": y, "dx": dx, "dA": da, "dB": db}

    failures: list[str] = []
    not_tuned: list[str] = []
    rows: list[str] = []
    cases = [(m, p) for m in args.m for p in args.p]

    tune_env = "LORA_KERNELS_TRITON_AUTOTUNE"

    def tuned_run(tune, *a, **kw):
        saved = os.environ.get(tune_env, "0")
        os.environ[tune_env] = "1" if tune and not args.dry_run else "0"
        try:
            return run(*a, **kw)
        finally:
            os.environ[tune_env] = saved

    def report(m, p, n_log):
        for entry in configs.tuning_log[n_log:]:
            times = entry["times"]
            ranked = sorted(times, key=times.get)
            print(
                f"  tuned {entry['kind']:5s} M={m} p={p}: best {entry['best']} {times[entry['best']]:.4f} ms; "
                f"next {[(c, round(times[c], 4)) for c in ranked[1:3]]}"
            )
            rows.append(f"    # {entry['kind']} M={m} p={p}: {times[entry['best']]:.4f} ms\n    {entry['best']},")

    def one_case(m, p):
        x, w, a, b, g = inputs(m)
        # 1. tuning, in priority order (cases are ordered M=8192 first): the kernels the auto plan launches
        # (forward + backward) are tuned while the budget lasts; the other plan runs on default tiles (compared
        # only; the fused forward at M=8192 p=0 is tuned at the end if time is left)
        tune = time.perf_counter() - t_start < args.budget
        if not tune:
            not_tuned.append(f"M={m} p={p}")
        n_log = len(configs.tuning_log)
        t0 = time.perf_counter()
        auto = lkt.plans.resolve_plan("auto", m, p)
        tuned_run(tune, "triton", x, w, a, b, g, p)
        tuned_run(False, "triton", x, w, a, b, g, p, plan="split" if auto == "fused" else "fused")
        if not args.dry_run:
            torch.cuda.synchronize()
        print(f"M={m} p={p}: tuning/compile {time.perf_counter() - t0:.1f} s (auto plan: {auto})")
        report(m, p, n_log)

        # 2. timing
        def fwd(plan):
            return lambda: run("triton", x, w, a, b, g, p, plan=plan, grads=False)

        with torch.no_grad():
            t_base = do_bench(lambda: torch.nn.functional.linear(x, w), warmup=10, rep=50)
            t_fused = do_bench(fwd("fused"), warmup=10, rep=50)
            t_split = do_bench(fwd("split"), warmup=10, rep=50)
            t_library = do_bench(fwd("library"), warmup=10, rep=50)
            t_auto = do_bench(fwd(None), warmup=10, rep=50)
        xg, ag, bg = x.detach().requires_grad_(), a.detach().requires_grad_(), b.detach().requires_grad_()
        y = lora_linear(xg, w, None, ag, bg, scale, p, seed=11, backend="triton")
        t_bwd = do_bench(lambda: torch.autograd.grad(y, (xg, ag, bg), g, retain_graph=True), warmup=10, rep=50)

        # the same backward in deterministic mode (per-row-tile partial stores + a fixed-order sum instead of fp32
        # atomics) and, for the library plan, with dB/db outside the epilogue (plans/library.LIBRARY_DB_ENV="launch"): if
        # either is faster, the atomics are what the epilogue waits on (NOTES.md, "Plans"). Each runs once first
        # (its own keys tune there, outside the timed region).
        def bwd_variant(deterministic=False, db_mode=None):
            saved_mode = os.environ.get(lkt.plans.library.LIBRARY_DB_ENV)
            if db_mode:
                os.environ[lkt.plans.library.LIBRARY_DB_ENV] = db_mode
            try:
                yv = lora_linear(xg, w, None, ag, bg, scale, p, seed=11, backend="triton", deterministic=deterministic)
                grad = lambda: torch.autograd.grad(yv, (xg, ag, bg), g, retain_graph=True)
                grad()
                return do_bench(grad, warmup=10, rep=50)
            finally:
                if saved_mode is None:
                    os.environ.pop(lkt.plans.library.LIBRARY_DB_ENV, None)
                else:
                    os.environ[lkt.plans.library.LIBRARY_DB_ENV] = saved_mode

        t_bwd_det = bwd_variant(deterministic=True)
        t_bwd_dbl = bwd_variant(db_mode="launch") if auto == "library" else float("nan")
        t_base_bwd = do_bench(lambda: torch.mm(g, w), warmup=10, rep=50)  # frozen base layer: dX = G W
        print(
            f"M={m} p={p}: fwd base {t_base:.4f} | fused {t_fused:.4f} (x{t_fused / t_base:.2f}) | split {t_split:.4f} "
            f"(x{t_split / t_base:.2f}) | library {t_library:.4f} (x{t_library / t_base:.2f}) | auto ({lkt.plans.resolve_plan('auto', m, p)}) {t_auto:.4f} ms; "
            f"bwd triton {t_bwd:.4f} (x{t_bwd / t_base_bwd:.2f}), deterministic {t_bwd_det:.4f}, "
            f"dB-by-launch {t_bwd_dbl:.4f}, vs base G W {t_base_bwd:.4f} ms"
        )

        # fwd+bwd per plan (the backward follows its forward's plan), base F.linear fwd+bwd as the floor: where
        # fused and library cross over in M decides plans.AUTO_LIBRARY_MIN_M
        def fwd_bwd(plan):
            def step():
                with lkt.forward_plan(plan):
                    yv = lora_linear(xg, w, None, ag, bg, scale, p, seed=11, backend="triton")
                torch.autograd.grad(yv, (xg, ag, bg), g)

            return do_bench(step, warmup=10, rep=50)

        xb = x.detach().requires_grad_()
        t_fb_base = do_bench(
            lambda: torch.autograd.grad(torch.nn.functional.linear(xb, w), (xb,), g), warmup=10, rep=50
        )
        fb = {plan: fwd_bwd(plan) for plan in ("fused", "split", "library")}
        print(
            f"M={m} p={p}: fwd+bwd base {t_fb_base:.4f} | "
            + " | ".join(f"{k} {v:.4f} (x{v / t_fb_base:.2f})" for k, v in fb.items())
            + f" ms; auto: {lkt.plans.resolve_plan('auto', m, p)}"
        )

        # 3. correctness vs the torch backend, fp64 oracle
        ref = run("torch", x.double(), w.double(), a.double(), b.double(), g.double(), p)
        tor = run("torch", x, w, a, b, g, p)
        for plan in ("fused", "split", "library"):
            tri = run("triton", x, w, a, b, g, p, plan=plan)
            for name in tri:
                ok, err, tol = oracle_check(tri[name], ref[name], tor[name])
                base = max_abs_err(tor[name], ref[name])
                if not ok:
                    failures.append(
                        f"M={m} p={p} {plan} {name}: err {err:.3e} > tol {tol:.3e} (2 x torch {base:.3e} + atol)"
                    )
                print(f"  check {plan:7s} {name:3s} err {err:.3e} torch {base:.3e} {'ok' if ok else 'MISMATCH'}")

    for m, p in cases:
        one_case(m, p)
        if not args.dry_run:
            torch.cuda.empty_cache()

    big = max(args.m)
    if 0.0 in args.p and big > 64 and not args.dry_run:
        if time.perf_counter() - t_start < args.budget:
            # the fused forward at large M, tuned, against the tuned split: the auto threshold's evidence
            for key in [key for key in configs._cache if key[0] == "fwd0" and key[1] == configs.m_bucket(big)]:
                del configs._cache[key]
            x, w, a, b, g = inputs(big)
            n_log = len(configs.tuning_log)
            tuned_run(True, "triton", x, w, a, b, g, 0.0, plan="fused", grads=False)
            report(big, 0.0, n_log)
            with torch.no_grad():
                t_f = do_bench(lambda: run("triton", x, w, a, b, g, 0.0, plan="fused", grads=False), warmup=10, rep=50)
                t_s = do_bench(lambda: run("triton", x, w, a, b, g, 0.0, plan="split", grads=False), warmup=10, rep=50)
            print(f"M={big} p=0, tuned tiles: fused {t_f:.4f} ms, split {t_s:.4f} ms (auto uses library for M > 64)")
        else:
            not_tuned.append(f"fused forward M={big} p=0 (compared on default tiles only)")

    print(
        "\nwinners, for lora_kernels/backends/triton/configs.py (_SM90 rows, first entry = default; fwd0 -> ('fwd', size),"
        " fwd1 -> ('fwd_gemm', size), fwd2 / gb -> ('fwd_xa', size), bwd -> ('bwd', size), bwd_epi -> ('bwd_epi', size)):"
    )
    print("\n".join(rows) if rows else "    (nothing tuned)")
    if not_tuned:
        print(f"not tuned (budget {args.budget:.0f} s spent): {', '.join(not_tuned)}")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    if failures:
        print("MISMATCHES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def host_time() -> int:
    """Per-call host time (us) of the Python path up to the kernel launch, on CPU tensors: the interpreter is
    switched off inside configs and the launch itself is stubbed, so this is everything our code adds
    (TRITON_INTERPRET=1 is set only so the registry's supports() accepts CPU tensors). M=16 decode shape."""
    import torch

    from lora_kernels.backends import LoRAOpts
    from lora_kernels.backends.triton import backend, configs, launch
    from lora_kernels.backends.triton.plans import fused
    from lora_kernels.functional import lora_linear

    configs.interpreting = lambda: False
    launch.launch_kernel = lambda kernel, grid, *a, count=True, **kw: None
    m, k, n, r = 16, 4096, 4096, 16
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    a, b = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    opts = LoRAOpts(scale=2.0)

    def timeit(fn, reps=300, rounds=25):
        for _ in range(100):
            fn()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps * 1e6)
        return best

    with torch.no_grad():
        print(
            f"plans.fused.forward             {timeit(lambda: fused.forward(x, w, None, a, b, None, 2.0, 0.0, 0, 0)):7.1f} us"
        )
        print(f"backend.apply (no grad)         {timeit(lambda: backend.apply(x, w, None, a, b, None, opts)):7.1f} us")
        print(
            f"lora_linear (no grad)           {timeit(lambda: lora_linear(x, w, None, a, b, 2.0, 0.0, backend='triton')):7.1f} us"
        )
    print(
        f"lora_linear (grad, forward)     {timeit(lambda: lora_linear(x, w, None, a, b, 2.0, 0.0, backend='triton')):7.1f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
