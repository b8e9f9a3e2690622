"""CUDA kernels: simple vs pipelined main loop vs the base layer (F.linear), on a GPU, in well under a minute.

    python -m benchmarks.gpu_cuda_perf                 # M in {16, 8192}, 4096 -> 4096, r=16, bf16, fp32 adapters
    python -m benchmarks.gpu_cuda_perf --m 8192 --csv out.csv

For each M and each policy (LORA_KERNELS_CUDA_KERNEL=simple|pipelined, the latter with LORA_KERNELS_CUDA_BK=32 (the
default) and 64; read by the extension at each call) it first
checks y, dx, dA, dB against the torch backend's fp64 evaluation (the tests' rule: error <= 2x torch's own error in
the same dtypes + 1e-6 relative), records which path the calls took (lora_kernels.backends.cuda.backend.last_path()), then
times fwd and fwd+bwd with benchmarks.timing.bench_gpu (median, p20, p80). F.linear (fwd) and F.linear + its
backward for x (fwd+bwd, the frozen-base floor: dX = G W) are the base. Prints a markdown table; exits 1 on any
mismatch or when the pipelined policy did not take the pipelined path.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F

from benchmarks.timing import bench_gpu
from lora_kernels.functional import lora_linear
from lora_kernels.testing import oracle_check

K = N = 4096
R = 16
P_DROP = 0.0  # the headline configuration; dropout is covered by the GPU tests


# LORA_KERNELS_CUDA_KERNEL, and for "pipelined-bk64" LORA_KERNELS_CUDA_BK=64 (3 stages of BK=64 instead of 4 of 32)
POLICIES = ("simple", "pipelined", "pipelined-bk64")


def set_policy(policy: str) -> None:
    os.environ["LORA_KERNELS_CUDA_KERNEL"] = policy.removesuffix("-bk64")
    os.environ["LORA_KERNELS_CUDA_BK"] = "64" if policy.endswith("-bk64") else "32"


def make(m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, dt=torch.bfloat16):
        return (torch.randn(*shape, generator=g) * std).to("cuda", dt)

    x = rnd(m, K)
    w = rnd(N, K, std=K**-0.5)
    a = rnd(R, K, std=K**-0.5, dt=torch.float32)
    b = rnd(N, R, std=R**-0.5, dt=torch.float32)
    gy = rnd(m, N)
    return x, w, a, b, gy


def fwd_bwd(backend, x, w, a, b, gy):
    x = x.detach().requires_grad_(True)
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    y = lora_linear(x, w, None, a, b, 2.0, P_DROP, backend=backend)
    dx, da, db = torch.autograd.grad(y, [x, a, b], gy.to(y.dtype))
    return {"y": y.detach(), "dx": dx, "dA": da, "dB": db}


def check(m: int) -> tuple[bool, list[str]]:
    """Both policies against the fp64 torch oracle; returns (ok, report lines)."""
    from lora_kernels.backends.cuda.backend import last_path

    x, w, a, b, gy = make(m)
    ref = fwd_bwd("torch", x.double(), w.double(), a.double(), b.double(), gy.double())
    tor = fwd_bwd("torch", x, w, a, b, gy)
    ok, lines = True, []
    for policy in POLICIES:
        set_policy(policy)
        cu = fwd_bwd("cuda", x, w, a, b, gy)
        path = last_path()
        if policy != "simple" and not (path["fwd"].startswith("pipelined") and path["bwd"].startswith("pipelined")):
            ok = False
            lines.append(f"FAIL M={m} {policy}: took {path}")
        for name in cu:
            good, err, tol = oracle_check(cu[name], ref[name], tor[name])
            ok &= good
            lines.append(
                f"{'ok  ' if good else 'FAIL'} M={m:5d} {policy:14s} {name:2s} err={err:.3e} tol={tol:.3e} "
                f"path fwd={path['fwd']!r} bwd={path['bwd']!r}"
            )
    return ok, lines


def time_all(m: int, rep_ms: float) -> list[dict]:
    x, w, a, b, gy = make(m)
    rows = []
    xg = x.detach().requires_grad_(True)

    def base_fwd():
        return F.linear(x, w)

    def base_fb():
        y = F.linear(xg, w)
        y.backward(gy)

    flops_fwd = 2.0 * m * N * K
    rows.append(("F.linear", "fwd", bench_gpu(base_fwd, rep_ms=rep_ms), flops_fwd))
    rows.append(("F.linear", "fwd+bwd", bench_gpu(base_fb, grad_to_none=[xg], rep_ms=rep_ms), 2 * flops_fwd))
    xl, al, bl = (t.detach().requires_grad_(True) for t in (x, a, b))
    # the headline (no dropout) for both policies, then the pipelined one with dropout: its forward hashes the mask
    # of every X element once per column of CTAs (N/128 times), the cost to watch
    for policy, p in (*((pol, P_DROP) for pol in POLICIES), ("pipelined", 0.1)):
        set_policy(policy)
        name = f"cuda-{policy}" + (f" p={p}" if p else "")

        def lora_fwd(p=p):
            with torch.no_grad():
                return lora_linear(x, w, None, a, b, 2.0, p, backend="cuda")

        def lora_fb(p=p):
            y = lora_linear(xl, w, None, al, bl, 2.0, p, backend="cuda")
            y.backward(gy)

        rows.append((name, "fwd", bench_gpu(lora_fwd, rep_ms=rep_ms), flops_fwd))
        rows.append((name, "fwd+bwd", bench_gpu(lora_fb, grad_to_none=[xl, al, bl], rep_ms=rep_ms), 2 * flops_fwd))
    out = []
    for provider, mode, st, flops in rows:
        out.append(
            dict(
                M=m,
                provider=provider,
                mode=mode,
                median_ms=st.median_ms,
                p20_ms=st.p20_ms,
                p80_ms=st.p80_ms,
                base_tflops=flops / st.median_ms / 1e9,  # base-GEMM FLOPs per second (LoRA adds 0.8%)
            )
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[16, 8192])
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_cuda_perf: no CUDA device", file=sys.stderr)
        return 2
    import lora_kernels._C as C  # noqa: F401  (fails loudly when the extension is not built)

    saved = {v: os.environ.get(v) for v in ("LORA_KERNELS_CUDA_KERNEL", "LORA_KERNELS_CUDA_BK")}
    ok = True
    rows = []
    try:
        for m in args.m:
            good, lines = check(m)
            print("\n".join(lines), flush=True)
            ok &= good
        for m in args.m:
            rows += time_all(m, args.rep_ms)
    finally:
        for var, val in saved.items():
            if val is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = val
    print(f"\n{torch.cuda.get_device_name()}  K=N={K} r={R} bf16 activations, fp32 adapters, p={P_DROP}")
    print("| M | mode | provider | median ms | p20 | p80 | x base | base TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(b for b in rows if b["M"] == row["M"] and b["mode"] == row["mode"] and b["provider"] == "F.linear")
        print(
            f"| {row['M']} | {row['mode']} | {row['provider']} | {row['median_ms']:.3f} | {row['p20_ms']:.3f} | "
            f"{row['p80_ms']:.3f} | {row['median_ms'] / base['median_ms']:.2f} | {row['base_tflops']:.0f} |"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    print("gpu_cuda_perf:", "passed" if ok else "FAILED (mismatch or wrong path, see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
