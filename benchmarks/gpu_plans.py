"""Every GPU plan next to base / addmm / PEFT, forward, backward and fwd+bwd, with host time per call (issue 20).

    python -m benchmarks.gpu_plans                       # M in {16, 1024, 8192}, p in {0, 0.1}, 4096 -> 4096, r=16
    python -m benchmarks.gpu_plans --m 8192 --p 0 --csv out.csv
    python -m benchmarks.gpu_plans --dry-run             # CPU: the flow at tiny sizes, CUDA plans skipped

bf16 activations and base weight, fp32 adapters (PEFT's default), frozen base. Providers: ``base`` (F.linear),
``addmm`` (Unsloth's unfused composition), ``peft``, ``triton-fused|split|library``, ``cuda-fused|cublas``
(lora_kernels.backends.cuda.ops.plan) and ``auto`` (lora_linear with backend=None: what a user gets). Each
provider is first checked against the torch backend's fp64 evaluation (y, dx, dA, dB; the tests' rule: error <= 2x
torch's own error in the same dtypes + 1e-6 relative; p = 0.1 only for ours, whose mask is the shared hash),
then timed with benchmarks.timing.bench_gpu (median of do_bench, L2 flushed; host = median wall time to issue one
call on an idle device). Prints one markdown table per (M, p), then the issue's targets as PASS / MISS lines:

* the default path fwd+bwd <= 1.10x base and <= 0.92x addmm at M=8192 p=0, <= 1.15x base at p=0.1
  ("default": cuda-cublas, the path built for them, and auto);
* host time <= 0.3x device time at M >= 1024 (fwd+bwd, every lora_kernels provider).

Exit status 1 when a provider misses the oracle (a target MISS is reported, not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODES = ("fwd", "bwd", "fwd+bwd")
OURS = ("triton-fused", "triton-split", "triton-library", "cuda-fused", "cuda-cublas", "auto")
TARGETS = {"base_p0": 1.10, "addmm_p0": 0.92, "base_p01": 1.15, "host": 0.3}


def plan_context(provider: str):
    """The process-wide plan switch for one of our providers (a no-op context for the others)."""
    if provider.startswith("triton-"):
        from lora_kernels.backends.triton import forward_plan

        return forward_plan(provider.removeprefix("triton-"))
    if provider.startswith("cuda-"):
        from lora_kernels.backends.cuda.ops import plan

        return plan(provider.removeprefix("cuda-"))
    return contextlib.nullcontext()


def build(provider: str, inp, case):
    """``(forward(x, a, b) -> y, None)`` for ``provider``, or ``(None, reason)`` when it cannot run here (the
    backend or plan is unavailable: any other error propagates). Base, addmm and PEFT close over ``inp``'s adapters
    (PEFT over its own copies) and ignore ``a``, ``b``. Our providers run under :func:`plan_context`, which the
    caller holds for the whole build / check / timing of the provider (no plan switch inside the timed call)."""
    from benchmarks import providers as pv
    from lora_kernels import BackendUnavailableError, lora_linear

    if provider in ("base", "addmm", "peft"):
        try:
            fn = {"base": pv.build_base, "addmm": pv.build_addmm, "peft": pv.build_peft}[provider](inp, case).forward
        except ImportError as e:
            return None, f"{provider}: {e}"
        return (lambda x, a=None, b=None: fn(x)), None
    backend = None if provider == "auto" else provider.split("-")[0]
    w, s, p = inp.weight, inp.scale, case.dropout

    def forward(x, a=inp.lora_A, b=inp.lora_B):
        return lora_linear(x, w, None, a, b, s, p, True, seed=1, backend=backend)

    try:
        with torch.no_grad():
            forward(inp.x[:1])
    except (BackendUnavailableError, ImportError) as e:
        return None, f"{provider}: {type(e).__name__}: {e}"
    return forward, None


def _grads(fn, x, a, b, dy):
    x, a, b = (t.detach().requires_grad_(True) for t in (x, a, b))
    y = fn(x, a, b)
    return (y.detach(), *torch.autograd.grad(y, [x, a, b], dy.to(y.dtype), allow_unused=True))


def oracle(inp, case):
    """``(ref64, torch_same_dtype)``: (y, dx, dA, dB) of the torch backend in fp64 and in the case's dtypes."""
    from lora_kernels import lora_linear

    def run(dt):
        w = inp.weight.to(dt) if dt == torch.float64 else inp.weight

        def fn(x, a, b):
            return lora_linear(x, w, None, a, b, inp.scale, case.dropout, seed=1, backend="torch")

        ts = (inp.x, inp.lora_A, inp.lora_B, inp.dy)
        return _grads(fn, *(t.to(dt) if dt == torch.float64 else t for t in ts))

    return run(torch.float64), run(inp.x.dtype)


def check(provider, forward, inp, case, ref, tor) -> tuple[bool, str]:
    """y, dx, dA, dB against the fp64 oracle (the tests' rule); providers drawing dropout from torch's RNG are
    checked at p = 0 only; base has no LoRA term (only dx = G W is comparable... and it differs: not checked)."""
    from lora_kernels.testing import oracle_check

    if provider == "base" or (case.dropout > 0 and provider not in OURS):
        return True, "not checked"
    got = _grads(forward, inp.x, inp.lora_A, inp.lora_B, inp.dy)
    worst = (0.0, "")
    for name, o, r, t in zip(("y", "dx", "dA", "dB"), got, ref, tor):
        if o is None:  # PEFT's adapters are its own copies: no gradient for inp's
            continue
        ok, err, tol = oracle_check(o, r, t)
        if not ok:
            return False, f"{name} err {err:.3e} > tol {tol:.3e}"
        worst = max(worst, (err / tol if tol else 0.0, name))
    return True, f"ok (worst {worst[1]} at {worst[0]:.2f} of tol)"


def time_modes(forward, inp, dry: bool) -> dict[str, tuple[float, float]]:
    """``{mode: (device median ms, host ms per call)}``."""
    from benchmarks.timing import bench_gpu

    params = [inp.x, inp.lora_A, inp.lora_B]
    out = {}
    y_keep = forward(inp.x)
    fns = {
        "fwd": lambda: forward(inp.x),
        "bwd": lambda: y_keep.backward(inp.dy, retain_graph=True),
        "fwd+bwd": lambda: forward(inp.x).backward(inp.dy),
    }
    for mode, fn in fns.items():
        if dry:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            out[mode] = (ms, ms)
            continue
        st = bench_gpu(fn, grad_to_none=params, warmup_ms=10, rep_ms=40)
        out[mode] = (st.median_ms, st.host_ms)
    return out


def measure(prov, inp, case, ref, tor, dry: bool, failures: list) -> list[dict]:
    """The oracle check and the timings of one provider at one case: its CSV rows ([] when it cannot run here)."""
    fwd, why = build(prov, inp, case)
    if fwd is None:
        print(f"skip {prov} at {case.label()}: {why}")
        return []
    ok, note = check(prov, fwd, inp, case, ref, tor)
    if not ok:
        failures.append(f"{prov} {case.label()}: {note}")
    return [
        dict(provider=prov, M=case.M, p=case.dropout, mode=mode, ms=ms, host_ms=host, check="ok" if ok else note)
        for mode, (ms, host) in time_modes(fwd, inp, dry).items()
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[16, 1024, 8192])
    ap.add_argument("--p", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--providers", nargs="+", default=["base", "addmm", "peft", *OURS])
    ap.add_argument("--csv", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, M in {16, 40}, 64 -> 72, r=4: the flow only")
    args = ap.parse_args()
    from benchmarks.providers import Case, make_inputs

    dry = args.dry_run
    if dry:
        args.m, args.k, args.n, args.r = [16, 40], 64, 72, 4
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton plans' flow on CPU (read at triton's import)
    elif not torch.cuda.is_available():
        print("gpu_plans: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    dev, dtype = ("cpu", "fp32") if dry else ("cuda", "bf16")
    rows, failures = [], []
    for m in args.m:
        for p in args.p:
            case = Case(M=m, K=args.k, N=args.n, r=args.r, dtype=dtype, adapter_dtype="fp32", dropout=p, device=dev)
            inp = make_inputs(case)
            ref, tor = oracle(inp, case)
            for prov in args.providers:
                try:
                    with plan_context(prov):
                        rows += measure(prov, inp, case, ref, tor, dry, failures)
                except Exception as e:  # a provider that runs here but raises: a failure, and the others go on
                    failures.append(f"{prov} {case.label()}: {type(e).__name__}: {e}")
            report(rows, m, p)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["provider"])
            w.writeheader()
            w.writerows(rows)
    targets(rows)
    if failures:
        print("MISMATCHES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _get(rows, prov, m, p, mode):
    for r in rows:
        if (r["provider"], r["M"], r["p"], r["mode"]) == (prov, m, p, mode):
            return r
    return None


def report(rows, m, p) -> None:
    print(f"\n### M={m} p={p:g} (ms: device median | host per call; ratios to base / addmm, fwd+bwd)\n")
    print("| provider | fwd | bwd | fwd+bwd | host fwd+bwd | host/device | x base | x addmm | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    base, addmm = _get(rows, "base", m, p, "fwd+bwd"), _get(rows, "addmm", m, p, "fwd+bwd")
    for prov in dict.fromkeys(r["provider"] for r in rows if r["M"] == m and r["p"] == p):
        cells = [_get(rows, prov, m, p, md) for md in MODES]
        fb = cells[2]
        rb = f"{fb['ms'] / base['ms']:.3f}" if base else "-"
        ra = f"{fb['ms'] / addmm['ms']:.3f}" if addmm else "-"
        print(f"| {prov} | " + " | ".join(f"{c['ms']:.4f}" for c in cells) +
              f" | {fb['host_ms']:.4f} | {fb['host_ms'] / fb['ms']:.2f} | {rb} | {ra} | {fb['check']} |")  # fmt: skip


def targets(rows) -> None:
    print("\n### targets (issue 20)")

    def ratio(prov, ref, p):
        a, b = _get(rows, prov, 8192, p, "fwd+bwd"), _get(rows, ref, 8192, p, "fwd+bwd")
        return None if a is None or b is None else a["ms"] / b["ms"]

    for prov in ("cuda-cublas", "auto"):
        for label, ref, p, limit in (("x base, p=0", "base", 0.0, TARGETS["base_p0"]),
                                     ("x addmm, p=0", "addmm", 0.0, TARGETS["addmm_p0"]),
                                     ("x base, p=0.1", "base", 0.1, TARGETS["base_p01"])):  # fmt: skip
            v = ratio(prov, ref, p)
            verdict = "n/a (not measured)" if v is None else ("PASS" if v <= limit else "MISS")
            shown = "-" if v is None else f"{v:.3f}"
            print(f"{verdict:5s} {prov} fwd+bwd M=8192 {label}: {shown} (target <= {limit})")
    for r in rows:
        if r["provider"] in OURS and r["mode"] == "fwd+bwd" and r["M"] >= 1024:
            v = r["host_ms"] / r["ms"]
            verdict = "PASS" if v <= TARGETS["host"] else "MISS"
            print(f"{verdict:5s} host/device {r['provider']} M={r['M']} p={r['p']:g}: {v:.2f} (target <= 0.3)")


if __name__ == "__main__":
    sys.exit(main())
