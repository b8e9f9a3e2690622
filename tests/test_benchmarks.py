"""The benchmark code itself, on CPU at tiny sizes: every provider runs, the CSV has the expected columns, the
table and the plot are produced, a wrong provider is flagged, and the device-check script's dry run passes.
No timing is asserted (CPU timings on shared machines are noise)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_lora, providers, report, timing  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# triton is left out here: its kernels are tested in their own files; the dry run below exercises it on GPU hosts.
PROVIDERS = "base,peft,addmm,torch,cuda"
LORA_PROVIDERS = ["peft", "addmm", "torch"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One run of every mode, shared by the tests that only read its outputs."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = _run(tmp_path_factory.mktemp("full"))
    return (*res, out.getvalue())


def _run(tmp_path, *extra) -> tuple[int, list[dict], Path, Path, Path]:
    csv_path, md, png = tmp_path / "b.csv", tmp_path / "b.md", tmp_path / "b.png"
    argv = ["--preset", "dry-run", "--providers", PROVIDERS, "--M", "5", "--shapes", "24x40", "--r", "3"]
    argv += ["--dtype", "fp32", "--dropout", "0,0.25", "--min-rounds", "2", "--max-rounds", "2"]
    argv += ["--csv", str(csv_path), "--md", str(md), "--plot", str(png), *extra]
    rc = bench_lora.main(argv)
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return rc, rows, csv_path, md, png


def test_every_provider_runs_and_outputs_are_written(full_run):
    rc, rows, csv_path, md, png, out = full_run
    assert rc == 0, out
    with csv_path.open(newline="") as f:
        assert next(csv.reader(f)) == bench_lora.COLUMNS
    assert "skip cuda:" in out  # an unavailable backend is named with its reason, never dropped silently
    got = {(r["provider"], r["mode"], r["M"], r["dropout"]) for r in rows}
    want = {
        (p, m, M, d)
        for p in ["base", *LORA_PROVIDERS]
        for m in bench_lora.MODES
        for M in ("5",)
        for d in ("0.0", "0.25")
    }
    assert got == want
    for r in rows:
        assert r["device"].startswith("CPU") and r["torch_version"] == torch.__version__ and r["run_id"]
        if r["mode"] == "memory":
            assert r["saved_bytes"] != "" and r["median_ms"] == ""
        else:
            assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
            assert float(r["tflops"]) > 0
            assert float(r["paired_ratio_to_base"]) > 0 and float(r["paired_ratio_to_peft"]) > 0
            if r["provider"] == "base":
                assert float(r["ratio_to_base"]) == 1.0 and float(r["paired_ratio_to_base"]) == 1.0
        if r["provider"] in LORA_PROVIDERS:
            assert r["check"].startswith("ok"), r
            assert float(r["max_err"]) <= float(r["tol"])
        else:
            assert r["check"] == "n/a"
    text = md.read_text()
    for name in ["base", *LORA_PROVIDERS]:
        assert f" {name} |" in text
    assert "fwd+bwd: ms" in text and "MISMATCH" not in text
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_saved_bytes_follow_the_design(full_run):
    """base saves no activation; the torch backend never saves a second M x K tensor, PEFT does with dropout."""
    rc, rows, *_ = full_run
    assert rc == 0
    mem = {(r["provider"], r["M"], r["dropout"]): int(r["saved_bytes"]) for r in rows if r["mode"] == "memory"}
    for M in ("5",):
        m, k, rank = int(M), 24, 3
        assert mem[("base", M, "0.0")] == 0
        for d in ("0.0", "0.25"):
            assert mem[("torch", M, d)] <= m * k * 4 + m * rank * 4 + 64  # X and XA (fp32), nothing M x K more
        # PEFT with dropout keeps the dropped copy of X (fp32) and the mask (bool) besides X itself
        assert mem[("peft", M, "0.25")] >= m * k * 4 + m * k > mem[("torch", M, "0.25")]


def test_mismatch_is_flagged_and_fails(tmp_path, monkeypatch, capsys):
    good = providers.build_addmm

    def wrong_scale(inp, case):
        b = good(inp, case)
        fwd = b.forward
        b.forward = lambda x: fwd(x) * 1.01  # a 1% error: far below O(1), far above rounding
        return b

    monkeypatch.setattr(providers, "build_addmm", wrong_scale)
    rc, rows, _, md, _ = _run(tmp_path, "--modes", "fwd")
    assert rc == 1
    assert all(r["check"].startswith("MISMATCH") for r in rows if r["provider"] == "addmm")
    assert all(r["check"].startswith("ok") for r in rows if r["provider"] == "torch")
    assert "MISMATCH" in md.read_text()
    assert "CORRECTNESS/RUN FAILURE" in capsys.readouterr().out


def test_report_cli_from_csv(tmp_path, full_run):
    csv_path = tmp_path / "copy.csv"
    csv_path.write_bytes(full_run[2].read_bytes())
    bench_lora.main(["--preset", "dry-run", "--providers", "base,torch", "--M", "3", "--shapes", "8x8", "--r", "2",
                     "--dtype", "fp32", "--modes", "fwd", "--min-rounds", "2", "--max-rounds", "2",
                     "--csv", str(csv_path), "--md", str(tmp_path / "x.md"), "--plot", "none"])  # fmt: skip
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert report.main([str(csv_path), "--md", str(md), "--plot", str(png)]) == 0
    latest = md.read_text()
    assert "| 3 | 8->8 |" in latest and "24->40" not in latest  # only the latest run by default
    assert report.main([str(csv_path), "--md", str(md), "--all-runs"]) == 0
    assert "24->40" in md.read_text()
    first = report.read_csv(csv_path, all_runs=True)[0]["run_id"]
    assert report.main([str(csv_path), "--md", str(md), "--run", first[:18]]) == 0
    assert "24->40" in md.read_text() and "| 3 | 8->8 |" not in md.read_text()
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_a_crashing_provider_is_dropped_alone(tmp_path, monkeypatch, capsys):
    good = providers.build_addmm

    def crashes_in_backward(inp, case):
        b = good(inp, case)
        fwd = b.forward
        b.forward = lambda x: fwd(x) if not torch.is_grad_enabled() else _Boom.apply(fwd(x))
        return b

    monkeypatch.setattr(providers, "build_addmm", crashes_in_backward)
    rc, rows, *_ = _run(tmp_path, "--modes", "fwd,bwd", "--M", "4", "--dropout", "0")
    assert rc == 1
    got = {(r["provider"], r["mode"]) for r in rows}
    assert ("addmm", "fwd") in got and ("addmm", "bwd") not in got and ("torch", "bwd") in got
    assert "FAIL addmm bwd: RuntimeError: boom" in capsys.readouterr().out


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom")


def test_csv_from_an_older_version_is_migrated(tmp_path):
    p = tmp_path / "old.csv"
    p.write_text("provider,median_ms,gone\nbase,1.0,x\n")
    bench_lora.append_csv(p, [{"provider": "torch", "median_ms": 2.0, "host_ms": 0.5}])
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f))
    assert header == bench_lora.COLUMNS + ["gone"]
    assert rows[0]["provider"] == "base" and rows[0]["gone"] == "x" and rows[0]["host_ms"] == ""
    assert rows[1]["provider"] == "torch" and rows[1]["host_ms"] == "0.5"


def test_timing_stats_and_interleaving():
    s = timing.stats_of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median_ms, s.p20_ms, s.p80_ms, s.n) == (3.0, 1.8, 4.2, 5)
    order = []
    jobs = {n: timing.CpuJob(lambda n=n: order.append(n)) for n in "abc"}
    res = timing.bench_cpu_interleaved(jobs, warmup=1, min_rounds=3, max_rounds=3, target_s=0)
    assert order[3:] == list("abcbcacab")  # after one warm-up each: rotated rounds
    assert all(r.n == 3 for r in res.values())


def test_flops_count():
    c = providers.Case(M=2, K=3, N=5, r=7)
    assert bench_lora.flops(c, "fwd", False) == 2 * 2 * 3 * 5
    assert bench_lora.flops(c, "fwd", True) == 2 * 2 * 3 * 5 + 2 * 2 * 7 * (3 + 5)
    assert bench_lora.flops(c, "fwd+bwd", True) == 2 * (2 * 2 * 3 * 5) + 3 * (2 * 2 * 7 * (3 + 5))


@pytest.mark.timeout(200)
def test_device_check_dry_run(tmp_path):
    """The GPU lease's script runs end to end on CPU (build and GPU tests are left to the full dry run)."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    env["DC_BENCH_ARGS"] = "--providers base,torch,cuda --M 4 --dropout 0.1 --dtype fp32"
    steps = "info,sanitize,bench,memscale,tune,bisect"
    cmd = ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--cpu-dry-run", "--steps", steps]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # never leave the script's children running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stdout[-4000:] + stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["bench.csv", "bench.md", "bench.png", "device_check.log", "memory_scale.csv"]
    rows = list(csv.DictReader((tmp_path / "out" / "memory_scale.csv").open()))
    assert [r["config"] for r in rows] == ["ours-both", "hf-peft-ckpt"]
    assert "DEVICE CHECK PASSED" in stdout
    # the unaligned-bug bisection ran every trial (under the interpreter they all pass: the bug is GPU-only)
    results = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(results) == 16 and all(ln.split()[3] == "ok" for ln in results if "ptxas" not in ln), results
    assert "gpu_unaligned_bisect: 16 trials, 0 not ok" in stdout
    # the tune step checked every plan against the torch oracle (no tuning under the interpreter)
    assert stdout.count("check library") == 16 and "MISMATCH" not in stdout  # 2 M x 2 p x 4 outputs
    table_last = (tmp_path / "out" / "bench.md").read_text().rstrip().splitlines()[-1]
    assert stdout.rstrip().splitlines()[-1] == table_last  # the table is printed last


def test_gpu_code_path_plumbing(monkeypatch, capsys):
    """The GPU branch of run_case (per-provider do_bench, peak memory) with the device calls faked on CPU."""
    calls = []

    def fake_bench_gpu(fn, grad_to_none, warmup_ms, rep_ms):
        for _ in range(2):
            for t in grad_to_none:
                t.grad = None
            fn()
        calls.append(len(grad_to_none))
        return timing.Stats(2.0, 1.0, 3.0, 2)

    def fake_peak(built, inp):
        built.forward(inp.x).backward(inp.dy)
        return 1000 + len(built.params)

    monkeypatch.setattr(bench_lora, "_on_gpu", lambda case: True)
    monkeypatch.setattr(bench_lora, "bench_gpu", fake_bench_gpu)
    monkeypatch.setattr(bench_lora, "peak_bytes_gpu", fake_peak)
    case = providers.Case(M=6, K=16, N=8, r=2, dropout=0.1)
    s = bench_lora.Settings(device="cpu", modes=list(bench_lora.MODES), providers=["base", "peft", "addmm", "torch"])
    rows, fails = bench_lora.run_case(case, s, print)
    assert fails == []
    assert len(calls) == 3 * 4 and calls.count(1) == 3  # base resets only x.grad; the others x, A, B
    report_md = report.markdown(
        [{k: ("" if r.get(k) is None else str(r.get(k))) for k in bench_lora.COLUMNS} for r in rows]
    )
    assert "host time" not in report_md  # the fake records no host time
    mem = {r["provider"]: r for r in rows if r["mode"] == "memory"}
    assert mem["base"]["peak_bytes"] == 1000 and mem["torch"]["ratio_to_base"] == 1.002
    assert all(r["ratio_to_base"] == 1.0 for r in rows if r["mode"] != "memory")


def test_bench_gpu_uses_do_bench_quantiles(monkeypatch):
    triton_testing = pytest.importorskip("triton.testing")
    seen = {}

    def fake_do_bench(fn, warmup, rep, grad_to_none, quantiles):
        seen.update(warmup=warmup, rep=rep, grads=grad_to_none, quantiles=quantiles)
        fn()
        return [2.0, 1.5, 2.5]

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)  # host_time_ms syncs around its calls
    x = torch.zeros(1, requires_grad=True)
    st = timing.bench_gpu(lambda: None, (x,), warmup_ms=7, rep_ms=40)
    assert (st.median_ms, st.p20_ms, st.p80_ms, st.n) == (2.0, 1.5, 2.5, 20)
    assert 0 <= st.host_ms < 2.0
    assert seen == dict(warmup=7, rep=40, grads=[x], quantiles=[0.5, 0.2, 0.8])


def test_variant_is_selected_before_every_timed_call(monkeypatch):
    """Triton plans / CUDA policies are process-wide: each timed call (backward-only too) selects its own."""
    monkeypatch.delenv(providers.CUDA_POLICY_ENV, raising=False)
    act = providers.variant_activator("cuda", "simple")
    act()
    assert os.environ[providers.CUDA_POLICY_ENV] == "simple"
    case = providers.Case(M=3, K=8, N=4, r=2)
    inp = providers.make_inputs(case)
    built = providers.build_base(inp, case)
    seen = []
    built.activate = lambda: seen.append("act")
    for mode in ("fwd", "bwd", "fwd+bwd"):
        fn, _, _keep = bench_lora._timed_fns(built, inp, mode)
        fn()
    assert seen == ["act"]  # base's forward does not call it; the bwd-only closure must
    assert providers.cuda_policies(case) == ()  # CPU: no CUDA variants
