"""Locate the Triton unaligned 16-bit GPU bug (lora_kernels/backends/triton/NOTES.md) in one device-check step.

GPU runs 1 and 3 (H200, triton 3.6) failed on two 16-bit launches whose sizes/strides are not multiples of 16:
fp16 M777 K1111 -> N555 r3 (wrong dX, max error ~15-20) and bf16 [4, 333, 1000] -> 700 r16, fp32 adapters,
grads of A and B only, deterministic (illegal address). The interpreter runs both correctly and in bounds, so the
question is which kernel, and what about the compiled launch, triggers it. Each trial below changes one thing:

    default      the launch as `auto` runs it (since run 4: 32 x 32 x 32 tiles for unaligned 16-bit launches)
    fwd-only     only the forward (no grad): forward kernel(s) alone
    stages1      every kernel single-stage (no software pipelining of the element-wise loads)
    tile32       32 x 32 x 32 tiles, 4 warps, 1 stage: mma.sync-sized, no 64-row wgmma
    padded       x, W, A, B and G as views into buffers whose row strides are multiples of 16 (the sizes, and so the
                 masks, unchanged; only Y's and dX's own row strides stay unaligned)
    split/fused  the other forward plan
    fp32         fp32 activations and adapters, same shape (passed in run 1): the control
    ptxas-system the default launch compiled with the system's ptxas (CUDA 13 on the GPU image; the triton 3.6
                 wheel bundles 12.8) through TRITON_PTXAS_PATH, in its own process with an empty Triton cache

Each trial prints ``RESULT <case> <trial> ok|WRONG|CRASH <detail>``. Trials run in a child process with
CUDA_LAUNCH_BLOCKING=1; a crash (illegal address is sticky for the process) is recorded and the next child resumes
at the following trial, so one crash costs one process start, not the rest of the run.

    python benchmarks/gpu_unaligned_bisect.py                 # on the GPU (device_check.sh step "bisect")
    python benchmarks/gpu_unaligned_bisect.py --dry-run       # CPU, Triton interpreter, small shapes
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# case -> (dtype, adapter dtype, lead dims, K, N, r, dropout, bias, grads, deterministic)
CASES = {
    "fp16-777x1111-555-r3": ("float16", "float16", (777,), 1111, 555, 3, 0.1, True, ("x", "b", "A", "B"), False),
    "bf16-4x333x1000-700-AB-det": ("bfloat16", "float32", (4, 333), 1000, 700, 16, 0.0, False, ("A", "B"), True),
    "bf16-4x333x1000-700-AB-atomic": ("bfloat16", "float32", (4, 333), 1000, 700, 16, 0.0, False, ("A", "B"), False),
}
DRY_CASES = {
    "fp16-37x71-45-r3": ("float16", "float16", (37,), 71, 45, 3, 0.1, True, ("x", "b", "A", "B"), False),
    "bf16-2x13x40-28-AB-det": ("bfloat16", "float32", (2, 13), 40, 28, 16, 0.0, False, ("A", "B"), True),
}
# most telling first: a step timeout that cuts the run short loses the least
TRIALS = ("default", "padded", "tile32", "stages1", "ptxas-system", "fwd-only", "other-plan", "fp32")
FRESH = {"ptxas-system"}  # trials that need their own process (compiler settings are cached per process)
TILES = {
    "stages1": {"fwd": (64, 128, 64, 8, 4, 1), "bwd": (64, 64, 128, 8, 4, 1)},
    "tile32": {"fwd": (32, 32, 32, 8, 4, 1), "bwd": (32, 32, 32, 8, 4, 1)},
}


def _padded(t):
    """``t`` (2-D or 3-D, last dim contiguous) as a view with the same values whose row strides are multiples
    of 16 elements and whose base is 16-byte aligned."""
    import torch

    *lead, last = t.shape
    row = -(-last // 16) * 16
    buf = torch.zeros((*lead, row), dtype=t.dtype, device=t.device)
    view = buf[..., :last]
    view.copy_(t)
    return view


def run_trial(case: str, trial: str, spec, device: str) -> str:
    """One trial; returns ``ok ...`` or ``WRONG ...`` (a crash never returns)."""
    import contextlib

    import torch

    from lora_kernels.backends.triton import configs, launch, plans
    from lora_kernels.functional import lora_linear
    from lora_kernels.testing import oracle_check

    dt_name, adt_name, lead, k, n, r, p, bias, grads, det = spec
    dtype, adt = getattr(torch, dt_name), getattr(torch, adt_name)
    if trial == "fp32":
        dtype = adt = torch.float32
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dt)

    x, w = rnd(*lead, k), rnd(n, k, std=k**-0.5)
    b = rnd(n, std=0.1) if bias else None
    a, bb = rnd(r, k, std=k**-0.5, dt=adt), rnd(n, r, std=r**-0.5, dt=adt)
    g = rnd(*lead, n)
    if trial == "padded":
        x, w, a, bb, g = (_padded(t) for t in (x, w, a, bb, g))
        assert launch.aligned((), x, w, a, bb, g), "padding did not align the operands"

    def run(backend, tensors, gy, fwd_only):
        x_, w_, b_, a_, bb_ = tensors
        inputs = {"x": x_, "b": b_, "A": a_, "B": bb_}
        for name, t in inputs.items():
            if t is not None:
                t.requires_grad_(name in grads and not fwd_only)
        with torch.no_grad() if fwd_only else contextlib.nullcontext():
            y = lora_linear(x_, w_, b_, a_, bb_, 2.0, p, seed=3, backend=backend, deterministic=det)
        out = {"y": y.detach()}
        if not fwd_only:
            wanted = [nm for nm in grads if inputs[nm] is not None]
            res = torch.autograd.grad(y, [inputs[nm] for nm in wanted], gy)
            out.update({"d" + nm: t for nm, t in zip(wanted, res)})
        return out

    def clones(ts, to=None):
        return [None if t is None else t.detach().clone().to(to or t.dtype) for t in ts]

    fwd_only = trial == "fwd-only"
    plan = None  # the auto plan, except in "other-plan": the one auto would not pick for these rows
    if trial == "other-plan":
        plan = "fused" if x.numel() // k >= plans.AUTO_LIBRARY_MIN_M else "split"
    tiles = TILES.get(trial, {})
    with plans.forward_plan(plan):
        with configs.override(**tiles) if tiles else contextlib.nullcontext():
            tri = run("triton", clones((x, w, b, a, bb)), g, fwd_only)
            if device == "cuda":
                torch.cuda.synchronize()
    tor = run("torch", clones((x, w, b, a, bb)), g, fwd_only)
    ref = run("torch", clones((x, w, b, a, bb), torch.float64), g.double(), fwd_only)
    worst = ""
    for name in tri:
        ok, err, tol = oracle_check(tri[name], ref[name], tor[name])
        if not ok:
            bad = (tri[name].double() - ref[name]).abs() > tol
            where = [int(v) for v in bad.reshape(-1, bad.shape[-1]).nonzero()[0].tolist()]
            frac = bad.double().mean().item()
            worst += f" {name}: err {err:.3g} > tol {tol:.3g} ({frac:.1%} of elements; first at {where})"
    return ("WRONG" + worst) if worst else "ok"


def system_ptxas() -> str | None:
    """The CUDA toolkit's ptxas (not the one inside the triton wheel), if there is one."""
    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if d and os.access(os.path.join(d, "bin", "ptxas"), os.X_OK):
            return os.path.join(d, "bin", "ptxas")
    found = shutil.which("ptxas")
    return found if found and "triton" not in found else None


def child(cases: dict, start: int, device: str, only: bool) -> None:
    todo = [(c, t) for c in cases for t in TRIALS][start:]
    for i, (case, trial) in enumerate(todo, start):
        if trial in FRESH and not only:
            return  # the parent starts a process for it
        print(f"START {i} {case} {trial}", flush=True)
        t0 = time.perf_counter()
        if trial == "ptxas-system" and device == "cpu":
            res = "skipped (interpreter: no compiler)"
        else:
            try:
                res = run_trial(case, trial, cases[case], device)
            except Exception as e:  # a Python-side error (compile failure, OutOfResources): recorded, not fatal
                res = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"RESULT {case} {trial} {res} [{time.perf_counter() - t0:.1f}s]", flush=True)
        if only:
            return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, small shapes")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = DRY_CASES if args.dry_run else CASES
    device = "cpu" if args.dry_run else "cuda"
    if args.child is not None:
        child(cases, args.child, device, args.only)
        return 0
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    total = len(cases) * len(TRIALS)
    nxt, results = 0, []
    order = [(c, t) for c in cases for t in TRIALS]
    while nxt < total:
        before = nxt
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(nxt)] + (["--dry-run"] if args.dry_run else [])
        env_now = env
        if order[nxt][1] in FRESH:
            cmd.append("--only")
            ptxas = system_ptxas()
            if ptxas is None and not args.dry_run:
                line = f"RESULT {order[nxt][0]} {order[nxt][1]} skipped (no system ptxas found)"
                results.append(line)
                print(line, flush=True)
                nxt += 1
                continue
            if ptxas is not None:
                env_now = dict(env, TRITON_PTXAS_PATH=ptxas, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="bisect-cache-"))
        with tempfile.TemporaryFile("w+") as errf:
            # results are streamed as they come, so a step timeout that kills this script keeps what was printed
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env_now, stdout=subprocess.PIPE, stderr=errf, text=True)
            started = None
            for line in proc.stdout:
                if line.startswith("START "):
                    started = int(line.split()[1])
                elif line.startswith("RESULT "):
                    results.append(line.rstrip())
                    print(line.rstrip(), flush=True)
                    nxt = started + 1
            proc.wait()
            errf.seek(0)
            err = errf.read()
        if nxt < total and proc.returncode != 0:
            case, trial = order[nxt]
            last = next((ln for ln in reversed(err.splitlines()) if "Error" in ln or "error" in ln), "")
            line = f"RESULT {case} {trial} CRASH rc={proc.returncode}: {last[:200]}"
            results.append(line)
            print(line, flush=True)
            nxt += 1
        elif nxt == before:
            print(f"gpu_unaligned_bisect: child stopped at trial {nxt} without a result; stderr tail:\n{err[-2000:]}")
            return 2
    bad = [r for r in results if r.split()[3] not in ("ok", "skipped")]
    print(f"gpu_unaligned_bisect: {len(results)} trials, {len(bad)} not ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
