"""One forward + backward of the cuda backend at small odd shapes, checked against the torch backend; for
compute-sanitizer (csrc/README.md):

    compute-sanitizer --tool memcheck  python csrc/sanitize_check.py                # plan fused (both policies)
    compute-sanitizer --tool racecheck python csrc/sanitize_check.py
    compute-sanitizer --tool memcheck  python csrc/sanitize_check.py --plan cublas  # plan cublas (_C_cublas)

Exits 1 when a result misses the fp64 oracle by more than 2x torch's own error (+ 1e-6 relative), so a run that
the sanitizer passes but that computes garbage still fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from lora_kernels.functional import lora_linear
from lora_kernels.testing import oracle_check


def run(backend, x, w, b, a, bb, g, **kw):
    x, w, b, a, bb = (t.detach().requires_grad_(True) for t in (x, w, b, a, bb))
    y = lora_linear(x, w, b, a, bb, 2.0, 0.2, seed=11, offset=5, backend=backend, **kw)
    grads = torch.autograd.grad(y, [x, b, a, bb], g.to(y.dtype))
    return dict(zip(("y", "dx", "db", "dA", "dB"), (y.detach(), *grads)))


# (policy, M, K, N, r, dtypes): the simple kernels at a shape no tile divides (K % 8 != 0: every path falls back to
# them); the pipelined kernels (csrc/lora_pipe.cuh, 16-bit only, K and N multiples of 8) at M, K, N tails of the
# 128x128x32 tiles, a reduction shorter than the 4-stage ring (K=40 -> 2 tiles) and one longer (N=264 -> 9 tiles).
CASES = [
    ("simple", 37, 70, 150, 5, ("fp32", "bf16", "fp16")),
    ("pipelined", 37, 40, 136, 5, ("bf16", "fp16")),
    ("pipelined", 131, 264, 264, 16, ("bf16",)),
]
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.float32),
    "fp16": (torch.float16, torch.float16),
}


# plan cublas: r = 64 (its limit) and odd r, K- and M-splits > 1 (M=7 K=300; M=300), tails of every tile
CUBLAS_CASES = [
    ("cublas", 7, 300, 90, 3, ("fp32", "bf16", "fp16")),
    ("cublas", 300, 136, 264, 64, ("bf16", "fp16")),
    ("cublas", 131, 72, 130, 16, ("bf16",)),
]


def main() -> int:
    from lora_kernels.backends.cuda import ops
    from lora_kernels.backends.cuda.backend import last_path

    ap = argparse.ArgumentParser(description="compute-sanitizer workload for the CUDA backend's plans")
    ap.add_argument("--plan", choices=("fused", "cublas"), default="fused")
    plan = ap.parse_args().plan
    ops.set_plan(plan)
    cases = CUBLAS_CASES if plan == "cublas" else CASES
    failures = 0
    gen = torch.Generator().manual_seed(0)
    for policy, m, k, n, r, dts in cases:
        if policy != "cublas":
            os.environ["LORA_KERNELS_CUDA_KERNEL"] = policy
        for dtype, adt in (DTYPES[d] for d in dts):
            for deterministic in (False, True):

                def rnd(*shape, std=1.0, dt=dtype):
                    return (torch.randn(*shape, generator=gen) * std).to("cuda", dt)

                x, w, b = rnd(m, k), rnd(n, k, std=k**-0.5), rnd(n, std=0.1)
                a, bb, g = rnd(r, k, std=k**-0.5, dt=adt), rnd(n, r, std=r**-0.5, dt=adt), rnd(m, n)
                cu = run("cuda", x, w, b, a, bb, g, deterministic=deterministic)
                # plan cublas: the plan the call resolved (its backward runs the same plan: an argument of the op)
                path = last_path() if policy != "cublas" else dict.fromkeys(("fwd", "bwd"), ops.last_plan()["plan"])
                if not (path["fwd"].startswith(policy) and path["bwd"].startswith(policy)):
                    failures += 1
                    print(f"FAIL {policy} M={m} K={k} N={n}: took {path}")
                to = run("torch", x, w, b, a, bb, g)
                ref = run("torch", *(t.double() for t in (x, w, b, a, bb)), g.double())
                torch.cuda.synchronize()
                for name in cu:
                    ok, err, tol = oracle_check(cu[name], ref[name], to[name])
                    failures += not ok
                    tag = "ok  " if ok else "FAIL"
                    print(
                        f"{tag} {policy:9s} {m}x{k}x{n} r={r} {str(dtype):15s} det={deterministic!s:5s} {name:3s} "
                        f"err={err:.3e} tol={tol:.3e}"
                    )
    print("sanitize_check:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
