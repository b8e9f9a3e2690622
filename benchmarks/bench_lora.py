"""LoRA linear benchmark: every available provider, side by side, one CSV row per measurement.

    python -m benchmarks.bench_lora --preset cpu-headline     # issue 2's closing figure (fwd+bwd, M=2048, 4096², r=16)
    python -m benchmarks.bench_lora --preset cpu-peft         # issue 15: layer / torch vs PEFT at 3 shapes, p 0 and 0.1
    python -m benchmarks.bench_lora --preset cpu-broad        # minutes: time vs M on two Llama shapes
    python -m benchmarks.bench_lora --preset gpu-headline     # the device-check subset (M=16 and 8192, 4096², bf16)
    python -m benchmarks.bench_lora --preset dry-run          # the gpu-headline flow at tiny sizes on CPU

Modes (per provider):
    fwd       forward as in training (x requires grad, graph built), output discarded
    bwd       backward alone: one forward, then ``y.backward(dy, retain_graph=True)`` timed
    fwd+bwd   forward + backward
    memory    GPU: peak ``torch.cuda.max_memory_allocated`` over fwd+bwd above what was allocated before (inputs,
              weights, dy); CPU and GPU: bytes saved for backward (``saved_tensors_hooks``, unique storages, the
              layer's parameters excluded), i.e. the activation memory a layer holds between forward and backward

Correctness cross-check (every run, every provider with a LoRA term): the provider's forward output against the
torch backend computed in a higher precision (fp64 for fp32 cases, fp32 otherwise) on the same inputs. The bound is
derived, not picked: ``2 x`` the max error of the plain eager composition in the case's dtype (what PEFT computes)
plus half an ulp of the output's largest magnitude. Providers that draw dropout from torch's RNG (peft, addmm) are
checked at p=0; ours with the case's p and a fixed seed. A mismatch is recorded in the ``check`` column, flagged in
the table, and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from . import providers as P
from . import report
from .crosscheck import Checker
from .presets import MODES, PRESETS
from .timing import CpuJob, Stats, bench_cpu_interleaved, bench_gpu

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

COLUMNS = [
    "provider", "mode", "M", "K", "N", "r", "dtype", "adapter_dtype", "dropout",
    "median_ms", "p20_ms", "p80_ms", "n_samples", "host_ms", "tflops", "peak_bytes", "saved_bytes",
    "ratio_to_base", "ratio_to_peft", "paired_ratio_to_base", "paired_ratio_to_peft", "max_err", "tol", "check",
    "device", "threads", "loadavg", "torch_version", "triton_version", "peft_version", "git_commit",
    "preset", "run_id", "timestamp",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # not installed, or broken: recorded as such, the run goes on
        return "none"


def git_commit() -> str:
    env = os.environ.get("BENCH_GIT_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lora_kernels", "csrc", "benchmarks"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


# ----------------------------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------------------------


def flops(case: P.Case, mode: str, has_lora: bool) -> float:
    """Useful FLOPs of one call: base 2MKN per GEMM; LoRA adds 2Mr(K+N) forward and 4Mr(K+N) backward (W frozen)."""
    base = 2.0 * case.M * case.K * case.N
    lora = 2.0 * case.M * case.r * (case.K + case.N) if has_lora else 0.0
    fwd, bwd = base + lora, base + 2 * lora
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def saved_bytes(built: P.Built, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in built.excluded_storages:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = built.forward(x)
    del y
    return sum(seen.values())


def peak_bytes_gpu(built: P.Built, inp: P.Inputs) -> int:
    """Peak allocated bytes over one fwd+bwd above what was allocated before it (second of two runs)."""
    peak = 0
    for _ in range(2):  # the first run may allocate cuBLAS workspaces that then stay
        for t in (inp.x, *built.params):
            t.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        built.forward(inp.x).backward(inp.dy)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    for t in (inp.x, *built.params):
        t.grad = None
    return peak


@dataclasses.dataclass
class Settings:
    device: str
    modes: list[str]
    providers: list[str]
    allow_interpreter: bool = False
    min_rounds: int = 5
    max_rounds: int = 25
    target_s: float = 10.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_sample_ms: float = 0.0  # CPU: repeat a call within one sample until the sample lasts this long


def _timed_fns(built: P.Built, inp: P.Inputs, mode: str):
    """(fn, grad_to_none, keepalive) for one provider and timing mode."""
    x, dy, fwd, act = inp.x, inp.dy, built.forward, built.activate
    grads = (x, *built.params)
    if mode == "fwd":
        return (lambda: fwd(x)), grads, None
    if mode == "fwd+bwd":
        return (lambda: fwd(x).backward(dy)), grads, None
    y = fwd(x)  # bwd: one forward, the graph kept alive across timed backwards
    if act is None:
        return (lambda: y.backward(dy, retain_graph=True)), grads, y
    return (lambda: (act(), y.backward(dy, retain_graph=True))), grads, y


def _bench_cpu(timed: dict, s: Settings) -> dict[str, Stats]:
    """Interleaved CPU rounds; with ``min_sample_ms`` every provider's sample repeats its call the same ``n`` times
    (grads reset before each call, as a training step would) and the statistics are per call."""
    n = 1
    if s.min_sample_ms > 0:
        fastest = min(_seconds(_repeated(fn, grads, 1)) for fn, grads, _keep in timed.values() for _ in range(3))
        n = max(1, math.ceil(s.min_sample_ms / max(fastest * 1e3, 1e-6)))
    jobs = {name: CpuJob(_repeated(fn, grads, n), grads) for name, (fn, grads, _keep) in timed.items()}
    res = bench_cpu_interleaved(jobs, min_rounds=s.min_rounds, max_rounds=s.max_rounds, target_s=s.target_s)
    per_call = {k: Stats(v.median_ms / n, v.p20_ms / n, v.p80_ms / n, v.n, tuple(t / n for t in v.samples)) for k, v in res.items()}  # fmt: skip
    return res if n == 1 else per_call


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _repeated(fn, grads, n: int):
    def run():
        for _ in range(n):
            for t in grads:
                t.grad = None
            fn()

    return run


def _on_gpu(case: P.Case) -> bool:
    return case.device.startswith("cuda")


def run_case(case: P.Case, s: Settings, log) -> tuple[list[dict], list[str]]:
    """Measure every provider on one case. Returns rows (without ratios) and the failure messages."""
    inp = P.make_inputs(case, seed=case.M * 7 + case.r)
    chosen, skipped = P.select(s.providers, case, inp, allow_interpreter=s.allow_interpreter)
    for sk in skipped:
        log(f"  skip {sk.name}: {sk.reason}")
    checker = Checker(case, inp)
    built: dict[str, P.Built] = {}
    rows: list[dict] = []
    failures: list[str] = []
    check: dict[str, tuple] = {}
    for name, builder in chosen:
        try:
            b = builder(inp, case)
            check[name] = checker.check(name, builder, b.own_rng, b.has_lora, b.activate)
            if name.startswith("cuda-"):
                from lora_kernels.backends.cuda.backend import last_path

                log(f"  {name}: main loop taken {last_path()}")
        except Exception as e:  # a provider that crashes is a failure to report, not a reason to stop the run
            failures.append(f"{case.label()} {name}: crashed: {type(e).__name__}: {e}")
            log(f"  FAIL {name}: {type(e).__name__}: {e}")
            continue
        built[name] = b
        err, tol, status = check[name]
        if status.startswith("MISMATCH"):
            failures.append(f"{case.label()} {name}: output max err {err:.3e} > tol {tol:.3e}")
        log(f"  check {name:13s} {status:10s}" + (f" max_err={err:.3e} tol={tol:.3e}" if err is not None else ""))

    def row(name, mode, stats: Stats | None = None, peak=None, saved=None):
        err, tol, status = check[name]
        r = dict(provider=name, mode=mode, max_err=err, tol=tol, check=status)
        if stats is not None:
            r.update(median_ms=stats.median_ms, p20_ms=stats.p20_ms, p80_ms=stats.p80_ms, n_samples=stats.n)
            r["_samples"] = stats.samples
            r["host_ms"] = stats.host_ms
            r["tflops"] = flops(case, mode, built[name].has_lora) / (stats.median_ms * 1e-3) / 1e12
        r.update(peak_bytes=peak, saved_bytes=saved)
        return r

    def fail(what: str, e: Exception) -> None:
        failures.append(f"{case.label()} {what}: crashed: {type(e).__name__}: {e}")
        log(f"  FAIL {what}: {type(e).__name__}: {e}")

    for mode in s.modes:
        if mode == "memory":
            for name, b in built.items():
                try:
                    peak = peak_bytes_gpu(b, inp) if _on_gpu(case) else None
                    rows.append(row(name, mode, peak=peak, saved=saved_bytes(b, inp.x)))
                except Exception as e:
                    fail(f"{name} {mode}", e)
            continue
        timed = {}
        for name, b in built.items():
            try:  # one untimed call first: a provider that crashes is dropped alone, with its reason
                fn, grads, keep = _timed_fns(b, inp, mode)
                for t in grads:
                    t.grad = None
                fn()
                timed[name] = (fn, grads, keep)
            except Exception as e:
                fail(f"{name} {mode}", e)
        if _on_gpu(case):
            for name, (fn, grads, _keep) in timed.items():
                try:
                    rows.append(row(name, mode, bench_gpu(fn, grads, s.warmup_ms, s.rep_ms)))
                except Exception as e:
                    fail(f"{name} {mode}", e)
        elif timed:
            try:
                res = _bench_cpu(timed, s)
                rows.extend(row(name, mode, res[name]) for name in timed)
            except Exception as e:
                fail(f"mode {mode}", e)
        del timed
    for r in rows:
        r.update(M=case.M, K=case.K, N=case.N, r=case.r, dtype=case.dtype, adapter_dtype=case.adapter_dtype)
        r.update(dropout=case.dropout)
    add_ratios(rows)
    return rows, failures


def _metric(r: dict):
    if r["mode"] != "memory":
        return r.get("median_ms")
    return r.get("peak_bytes") if r.get("peak_bytes") is not None else r.get("saved_bytes")


def add_ratios(rows: list[dict]) -> None:
    """Per mode: ``ratio_to_*`` = median / the reference's median (for ``memory``: peak bytes on GPU, saved bytes on
    CPU); CPU only, ``paired_ratio_to_*`` = median over the interleaved rounds of (this round's time / the
    reference's time in the same round), which cancels most of a shared machine's slow stretches."""
    for mode in {r["mode"] for r in rows}:
        same = {r["provider"]: r for r in rows if r["mode"] == mode}
        for ref_name, col in (("base", "ratio_to_base"), ("peft", "ratio_to_peft")):
            ref = same.get(ref_name)
            ref_v = _metric(ref) if ref is not None else None
            for r in same.values():
                v = _metric(r)
                r[col] = v / ref_v if (v is not None and ref_v) else None
                a, b = r.get("_samples"), (ref or {}).get("_samples")
                if a and b and len(a) == len(b) and min(b) > 0:
                    r["paired_" + col] = statistics.median(x / y for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows; a new file gets the header. A file written by an older version with other columns is rewritten
    once with this version's columns first (its own extra columns kept after them, missing cells left empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    header = COLUMNS
    if not new:
        with path.open(newline="") as f:
            old_header = next(csv.reader(f), [])
        if old_header != COLUMNS:
            with path.open(newline="") as f:
                old_rows = list(csv.DictReader(f))
            header = COLUMNS + [c for c in old_header if c not in COLUMNS]
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows({k: r.get(k) or "" for k in header} for r in old_rows)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in header})


def _csv_list(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def _shape(s: str) -> tuple[int, int]:
    k, n = s.lower().replace("->", "x").split("x")
    return int(k), int(n)


def _shapes(a, pre) -> list[tuple[int, int, int, int]]:
    """``(M, K, N, r)`` of every case: the preset's explicit ``cases``, or M x shapes x r (options override)."""
    if "cases" in pre and not (a.M or a.shapes or a.r):
        return list(pre["cases"])
    ms, shapes = a.M or pre.get("M") or sorted({c[0] for c in pre["cases"]}), a.shapes or pre.get("shapes")
    shapes = shapes or sorted({c[1:3] for c in pre["cases"]})
    ranks = a.r or pre.get("r") or sorted({c[3] for c in pre["cases"]})
    return [(m, k, n, r) for (k, n) in shapes for r in ranks for m in ms]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-headline")
    ap.add_argument("--device", help="cpu | cuda (default: the preset's)")
    ap.add_argument("--providers", type=_csv_list(str), help="comma list (default: the preset's, else all)")
    ap.add_argument("--modes", type=_csv_list(str), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--M", type=_csv_list(int), help="tokens, comma list")
    ap.add_argument("--shapes", type=_csv_list(_shape), help="KxN comma list, e.g. 4096x4096,4096x1024")
    ap.add_argument("--r", type=_csv_list(int), help="ranks, comma list")
    ap.add_argument("--dtype", type=_csv_list(str), help="fp32 | bf16 | fp16, comma list")
    ap.add_argument("--adapter-dtype", choices=["fp32", "act"], default="fp32", help="act: the activation dtype")
    ap.add_argument("--dropout", type=_csv_list(float), help="comma list")
    ap.add_argument("--csv", type=Path, help="CSV to append to (default benchmarks/results/<preset csv>)")
    ap.add_argument("--md", type=Path, help="markdown table of this run (default benchmarks/results/<preset md>)")
    ap.add_argument("--plot", type=Path, help="PNG, time vs M for fwd+bwd (default per preset; 'none' to skip)")
    ap.add_argument("--allow-interpreter", action="store_true", help="run triton on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: the preset's, else torch's)")
    ap.add_argument("--min-rounds", type=int)
    ap.add_argument("--max-rounds", type=int)
    ap.add_argument("--target-s", type=float, help="CPU: seconds of interleaved rounds per case and mode")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="GPU do_bench warm-up")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="GPU do_bench repetition time")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    pre = PRESETS[a.preset]
    device = a.device or pre["device"]
    allow_interp = a.allow_interpreter or pre.get("allow_interpreter", False)
    if device == "cpu" and allow_interp:
        # Must be set before lora_kernels.backends.triton decorates its kernels (it is imported lazily, after this).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"preset {a.preset!r} needs a CUDA device and none is available (use --device cpu)", file=sys.stderr)
        return 2
    if a.threads or pre.get("threads"):
        torch.set_num_threads(a.threads or pre["threads"])
    modes = a.modes or pre["modes"]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"--modes: unknown {bad}; known {MODES}", file=sys.stderr)
        return 2
    s = Settings(
        device=device, modes=modes, providers=a.providers or pre.get("providers", list(P.ALL_PROVIDERS)),
        allow_interpreter=allow_interp, min_sample_ms=pre.get("min_sample_ms", 0.0),
        min_rounds=a.min_rounds or pre.get("min_rounds", 5), max_rounds=a.max_rounds or pre.get("max_rounds", 25),
        target_s=a.target_s if a.target_s is not None else pre.get("target_s", 10.0),
        warmup_ms=a.warmup_ms, rep_ms=a.rep_ms,
    )  # fmt: skip
    cases = [
        P.Case(M=m, K=k, N=n, r=r, dtype=dt, adapter_dtype="fp32" if a.adapter_dtype == "fp32" else dt, dropout=p,
               device=device)
        for dt in (a.dtype or pre["dtype"]) for (m, k, n, r) in _shapes(a, pre)
        for p in (a.dropout if a.dropout is not None else pre["dropout"])
    ]  # fmt: skip
    csv_path = a.csv or RESULTS / pre["csv"]
    md_path = a.md or RESULTS / pre["md"]
    plot_path = a.plot if a.plot is not None else (RESULTS / pre["plot"] if pre.get("plot") else None)
    if plot_path is not None and str(plot_path) == "none":
        plot_path = None

    meta = dict(
        device=device_name(device), threads=torch.get_num_threads(), torch_version=torch.__version__,
        triton_version=_version("triton"), peft_version=_version("peft"), git_commit=git_commit(),
        preset=a.preset, run_id=_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6],
    )  # fmt: skip
    print(f"bench_lora: preset={a.preset} device={meta['device']} torch={meta['torch_version']} "
          f"triton={meta['triton_version']} peft={meta['peft_version']} commit={meta['git_commit']} "
          f"threads={meta['threads']} cases={len(cases)} modes={','.join(modes)}", flush=True)  # fmt: skip
    import lora_kernels

    for name, info in lora_kernels.backend_info()["backends"].items():
        print(f"  backend {name}: {'available' if info['available'] else 'unavailable'} ({info['reason']})")

    all_rows: list[dict] = []
    failures: list[str] = []
    for case in cases:
        print(f"case {case.label()}", flush=True)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        try:
            rows, fails = run_case(case, s, lambda msg: print(msg, flush=True))
        except Exception as e:  # e.g. the reference itself failed: record it, measure the other cases
            import traceback

            traceback.print_exc()
            rows, fails = [], [f"{case.label()}: case crashed: {type(e).__name__}: {e}"]
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for r in rows:
            r.update(meta, timestamp=now, loadavg=None if load is None else round(load, 2))
        append_csv(csv_path, rows)  # per case: a crash later keeps what was measured
        all_rows.extend(rows)
        failures.extend(fails)
        for r in rows:
            if r["mode"] != "memory":
                print(f"  {r['mode']:8s} {r['provider']:13s} {r['median_ms']:10.4f} ms "
                      f"[{r['p20_ms']:.4f}, {r['p80_ms']:.4f}] x{r['ratio_to_base'] or float('nan'):.3f} base")  # fmt: skip
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()
    str_rows = [{k: ("" if r.get(k) is None else str(r.get(k))) for k in COLUMNS} for r in all_rows]
    table = report.markdown(str_rows)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(table)
    if plot_path is not None:
        try:
            report.plot(str_rows, plot_path)
            print(f"plot: {plot_path}")
        except ImportError as e:
            print(f"plot skipped: matplotlib not importable ({e})")
    print(f"csv: {csv_path} (+{len(all_rows)} rows)\nmarkdown: {md_path}")
    if failures:
        print(f"\n{len(failures)} CORRECTNESS/RUN FAILURE(S):")
        for f in failures:
            print(f"  FAIL {f}")
    print()
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
