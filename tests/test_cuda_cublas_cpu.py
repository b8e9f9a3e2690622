"""CPU-side checks of plan ``cublas`` (lora_kernels._C_cublas): the module imports without a GPU and fails cleanly
when called, the boundary names every bad argument, the plan is chosen (and refused) with a reason, a missing
cuBLASLt is a BackendUnavailableError, and the op contract registers and traces (opcheck and make_fx on fake CUDA
tensors: no device needed). The kernels' numerics on CPU: tests/test_cuda_cublas_emu.py; on a GPU:
tests/test_cuda_cublas.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HAS_CUDA
from torch._subclasses.fake_tensor import FakeTensorMode

import lora_kernels
from lora_kernels.backends.cuda import backend, cublas, ops

ROOT = Path(__file__).resolve().parents[1]
FAKE = 1 << 20  # a valid-looking, 256-byte aligned address: the boundary accepts it, the device check refuses it


def _module():
    mod, err = cublas.load()
    if mod is None:
        pytest.skip(f"lora_kernels._C_cublas not loadable here: {err}")
    return mod


def _fwd_kwargs(**over):
    kw = dict(x=FAKE, stride_x_m=64, weight=FAKE, bias=0, lora_a=FAKE, lora_b=FAKE, y=FAKE, xa=FAKE, workspace=FAKE,
              workspace_bytes=1 << 30, M=7, N=48, K=64, r=4, act_dtype=2, adapter_dtype=0, scale=2.0, dropout=False,
              seed=0, offset=0, threshold=0, inv_keep=1.0, device=0, stream=0)  # fmt: skip
    kw.update(over)
    return kw


def _bwd_kwargs(**over):
    kw = dict(grad_y=FAKE, stride_g_m=48, x=FAKE, stride_x_m=64, weight=FAKE, lora_a=FAKE, lora_b=FAKE, xa=FAKE,
              grad_x=FAKE, grad_flat=FAKE, grad_flat_len=4 * 64 + 48 * 4 + 48, off_da=0, off_db=256, off_dbias=448,
              workspace=FAKE, workspace_bytes=1 << 30, M=7, N=48, K=64, r=4, act_dtype=1, adapter_dtype=1, scale=2.0,
              dropout=True, seed=1, offset=0, threshold=1 << 31, inv_keep=2.0, device=0, stream=0)  # fmt: skip
    kw.update(over)
    return kw


def test_module_describes_itself():
    C = _module()
    assert C.MAX_RANK == cublas.MAX_RANK == 64
    assert "cuBLASLt" in C.cublaslt_info() and "built against" in C.cublaslt_info()
    assert "sm_" in C.runtime_info()
    # the splits are a function of the sizes only (bit-reproducible on any device)
    info = C.split_info(8192, 4096, 4096, 16)
    assert info == {"rp": 16, "fwd_ksplit": 2, "bwd_ksplit": 2, "msplit": 8, "rows_per_split": 1024}
    assert C.split_info(16, 4096, 4096, 16)["fwd_ksplit"] == 32 and C.split_info(16, 4096, 4096, 16)["msplit"] == 1


def test_workspace_sizes():
    C = _module()

    def a256(b):
        return -(-b // 256) * 256

    m, n, k, r, lt = 8192, 4096, 4096, 16, C.LT_WORKSPACE_BYTES
    assert C.fwd_workspace_bytes(m, n, k, r) == a256(2 * m * 16 * 4) + lt  # XA partials: ksplit 2, RP 16
    want = a256(2 * m * 16 * 4) + a256(8 * r * k * 4) + a256(8 * n * r * 4) + a256(8 * n * 4) + lt
    assert C.bwd_workspace_bytes(m, n, k, r) == want  # GB partials, dA / dB / db partials of 8 splits


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
@pytest.mark.parametrize("call", ["fwd", "bwd"])
def test_call_without_gpu_raises_clean_error(call):
    C = _module()
    kwargs = _fwd_kwargs() if call == "fwd" else _bwd_kwargs()
    with pytest.raises(RuntimeError, match=rf"lora_kernels\._C_cublas\.{call}: no usable CUDA device"):
        getattr(C, call)(**kwargs)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(x=0), r"fwd: x must be a non-null device pointer"),
        (dict(weight=FAKE + 1), r"weight .* must be aligned to its element size \(2 bytes\)"),
        (dict(lora_a=FAKE + 2), r"lora_a .* must be aligned to its element size \(4 bytes\)"),
        (dict(xa=FAKE + 2), r"xa .* must be aligned to its element size \(4 bytes\)"),
        (dict(r=0), r"r \(LoRA rank\) must be in \[1, 64\] for plan 'cublas', got 0"),
        (dict(r=65), r"r \(LoRA rank\) must be in \[1, 64\] for plan 'cublas', got 65"),
        (dict(K=0), r"K \(in_features\) must be >= 1"),
        (dict(N=0), r"N \(out_features\) must be >= 1"),
        (dict(M=-1), r"M \(rows of x\) must be >= 0"),
        (dict(M=65536 * 64), r"M \(rows of x\) must be <= 4194240 for plan 'cublas'"),
        (dict(stride_x_m=63), r"stride_x_m \(row stride\) must be >= 64, got 63"),
        (dict(act_dtype=7), r"act_dtype must be a dtype code 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 7"),
        (dict(act_dtype=1, adapter_dtype=2), r"adapter_dtype must be 0 \(float32\) or equal to act_dtype"),
        (dict(scale=float("inf")), r"scale must be finite"),
        (dict(dropout=True, inv_keep=0.5), r"inv_keep .* must be a finite float >= 1"),
        (dict(threshold=1 << 32), r"threshold must fit in 32 bits"),
        (dict(offset=1 << 63), r"offset must be < 2\*\*63"),
        (dict(workspace=FAKE + 16), r"workspace must be a non-null device pointer aligned to 256 bytes"),
        (dict(workspace_bytes=16), r"workspace_bytes must be >= fwd_workspace_bytes\(M, N, K, r\) = \d+, got 16"),
    ],
)
def test_fwd_boundary_names_the_bad_argument(over, match):
    C = _module()
    with pytest.raises(ValueError, match=match):
        C.fwd(**_fwd_kwargs(**over))


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(grad_y=0), r"bwd: grad_y must be a non-null device pointer"),
        (dict(x=0), r"bwd: x must be a non-null device pointer"),  # dA wanted: x is read
        (dict(xa=0), r"bwd: xa must be a non-null device pointer"),  # dB wanted: xa is read
        (dict(grad_flat=0), r"grad_flat must be a non-null device pointer"),
        (dict(grad_x=FAKE + 1), r"grad_x .* must be aligned to its element size \(2 bytes\)"),
        (dict(stride_g_m=47), r"stride_g_m \(row stride\) must be >= 48, got 47"),
        (dict(off_db=400), r"off_db must be -1 \(not wanted\) or an offset with room for 192 floats"),
        (dict(off_da=-2), r"off_da must be -1 \(not wanted\) or an offset"),
        (dict(grad_flat_len=-1), r"grad_flat_len must be >= 0"),
        (dict(adapter_dtype=2), r"adapter_dtype must be 0 \(float32\) or equal to act_dtype"),
        (dict(workspace_bytes=16), r"workspace_bytes must be >= bwd_workspace_bytes"),
    ],
)
def test_bwd_boundary_names_the_bad_argument(over, match):
    C = _module()
    with pytest.raises(ValueError, match=match):
        C.bwd(**_bwd_kwargs(**over))


def test_bwd_optional_pointers_may_be_null_when_not_needed():
    """x unused without dA, xa without dB, grad_x without dX: the boundary accepts null and goes on (no GPU here:
    the device check is what stops it)."""
    C = _module()
    kw = _bwd_kwargs(x=0, xa=0, grad_x=0, off_da=-1, off_db=-1, off_dbias=0, grad_flat_len=48)
    if HAS_CUDA:
        pytest.skip("checks the no-GPU path")
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        C.bwd(**kw)


# ---------------------------------------------------------------------------------------------- plan choice
def test_plan_selection_and_reasons(monkeypatch):
    monkeypatch.setattr(ops, "_plan", None)
    monkeypatch.setattr(ops, "_env_plan", None)
    monkeypatch.setenv(ops.PLAN_ENV, "cublas")
    assert ops.get_plan() == "cublas"
    monkeypatch.setenv(ops.PLAN_ENV, "fused")
    assert ops.get_plan() == "cublas"  # the environment is read once
    with ops.plan("fused"):
        assert ops.get_plan() == "fused" and ops.choose_plan(100, 16, 0.0) == "fused"
        assert ops.last_plan() == {"plan": "fused", "reason": "requested"}
    with pytest.raises(ValueError, match="cuda plan must be one of"):
        ops.set_plan("cutlass")
    monkeypatch.setattr(ops, "_env_plan", None)
    monkeypatch.setenv(ops.PLAN_ENV, "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_CUDA_PLAN must be one of"):
        ops.get_plan()


def test_auto_stays_fused_until_measured(monkeypatch):
    monkeypatch.setattr(ops, "_plan", "auto")
    assert ops.AUTO_CUBLAS_MIN_M is None
    assert ops.choose_plan(8192, 16, 0.0) == "fused"
    assert "not yet measured on a GPU" in ops.last_plan()["reason"]
    assert ops.CudaKernels().resolve_plan("auto", 8192, 0.0) == "fused"
    monkeypatch.setattr(ops, "AUTO_CUBLAS_MIN_M", 1024)
    monkeypatch.setattr(cublas, "availability", lambda: (True, "test"))
    assert ops.choose_plan(8192, 16, 0.0) == "cublas" and ops.choose_plan(512, 16, 0.0) == "fused"
    assert ops.choose_plan(8192, 100, 0.0) == "fused" and "r <= 64" in ops.last_plan()["reason"]


def test_requested_plan_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(ops, "_plan", "cublas")
    monkeypatch.setattr(cublas, "availability", lambda: (True, "test"))
    with pytest.raises(lora_kernels.BackendUnavailableError, match=r"supports ranks r <= 64, got r=65"):
        ops.choose_plan(100, 65, 0.0)
    monkeypatch.setattr(cublas, "_module", None)
    monkeypatch.setattr(cublas, "_error", "lora_kernels._C_cublas does not load (libcublasLt.so.13: cannot open)")
    monkeypatch.setattr(cublas, "availability", lambda: (False, "stub"))
    with pytest.raises(lora_kernels.BackendUnavailableError, match="requested.*cannot run this call: stub"):
        ops.choose_plan(100, 16, 0.0)
    with pytest.raises(lora_kernels.BackendUnavailableError, match=r"plan 'cublas' is unavailable: .*libcublasLt"):
        cublas.forward(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(1, 4), torch.zeros(3, 1), None,
                       1.0, 0.0, 0, 0)  # fmt: skip


def test_missing_cublaslt_is_reported_not_raised(monkeypatch):
    """An ImportError of the module (e.g. no libcublasLt) becomes the reason, never an import error."""
    import importlib

    def fail(name):
        raise ImportError("libcublasLt.so.99: cannot open shared object file: No such file or directory")

    from lora_kernels.backends.cuda import native

    monkeypatch.setattr(cublas, "_module", None)
    monkeypatch.setattr(cublas, "_error", None)
    # whatever the failing import leaves in the loaders' caches is undone at teardown
    monkeypatch.setattr(native, "_native", native._native)
    monkeypatch.setattr(native, "_native_error", native._native_error)
    monkeypatch.setattr(importlib, "import_module", fail)
    ok, why = cublas.availability()
    assert not ok and "libcublasLt.so.99" in why and "pip install nvidia-cublas" in why
    info = backend.plans_info()["cublas"]
    assert info["available"] is False and "libcublasLt.so.99" in info["reason"]


def test_cublaslt_candidates_find_the_wheel():
    """Every candidate exists; the installed nvidia-cublas wheel's library is among them."""
    found = cublas.cublaslt_candidates("libcublasLt.so.13")
    assert all(Path(p).is_file() for p in found)
    try:
        import nvidia

        wheel_libs = [Path(b) / "cu13" / "lib" / "libcublasLt.so.13" for b in nvidia.__path__]
    except ImportError:
        wheel_libs = []
    for lib in wheel_libs:
        if lib.is_file():
            assert str(lib) in found
    assert cublas._preload("no library named here") is None
    assert cublas.cublaslt_candidates("libcublasLt.so.999") == []


def test_import_is_lean():
    code = "import sys, lora_kernels; lora_kernels.backend_info(); assert 'lora_kernels._C_cublas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------- op contract
def _fake_inputs(dtype=torch.bfloat16, bias=True, device="cuda"):
    x = torch.empty(9, 40, device=device, dtype=dtype, requires_grad=True)
    w = torch.empty(24, 40, device=device, dtype=dtype)
    b = torch.empty(24, device=device, dtype=dtype, requires_grad=True) if bias else None
    a = torch.empty(3, 40, device=device, requires_grad=True)
    bb = torch.empty(24, 3, device=device, requires_grad=True)
    return x, w, b, a, bb


def test_op_schemas_register():
    fwd = torch.ops.lora_kernels.cuda_lora_fwd.default
    bwd = torch.ops.lora_kernels.cuda_lora_bwd.default
    assert "str plan" in str(fwd._schema) and "str plan" in str(bwd._schema)
    assert ops.lora_fwd is ops.CUDA_OP.fwd and set(ops.PLANS) == {"fused", "cublas"}


@pytest.mark.parametrize("plan", ["fused", "cublas"])
def test_opcheck_on_fake_tensors(plan):
    """Schema, autograd registration, fake impls and AOT dispatch of both ops on fake CUDA tensors (no device)."""
    with FakeTensorMode():
        x, w, b, a, bb = _fake_inputs()
        torch.library.opcheck(ops.lora_fwd, (x, w, b, a, bb, None, 2.0, 0.1, 3, 0, False, plan))
        g = torch.empty(9, 24, device="cuda", dtype=torch.bfloat16)
        xa = torch.empty(9, 3, device="cuda")
        args = (g, x.detach(), w, a.detach(), bb.detach(), None, xa, 2.0, 0.1, 3, 0, True, True, True, True, False,
                False, plan)  # fmt: skip
        torch.library.opcheck(ops.lora_bwd, args)


def test_fake_trace_of_forward_and_backward_runs_the_plan():
    """make_fx over meta tensors (the fake impls; CPU-only torch cannot run autograd on fake CUDA tensors): the
    forward op and, through its autograd formula, the backward op, both with the plan the forward ran (what
    torch.compile records)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, w, b, a, bb):
        y, _ = ops.lora_fwd(x, w, b, a, bb, None, 2.0, 0.1, 3, 0, False, "cublas")
        return torch.autograd.grad(y.float().sum(), [x, a, bb, b])

    graph = make_fx(step, tracing_mode="fake")(*_fake_inputs(device="meta"))
    code = graph.code
    assert "lora_kernels.cuda_lora_fwd" in code and "lora_kernels.cuda_lora_bwd" in code
    assert code.count("'cublas'") >= 2


def test_lora_linear_refuses_cpu_tensors_for_cuda():
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with ops.plan("cublas"), pytest.raises(lora_kernels.BackendUnavailableError, match="backend 'cuda' cannot run"):
        lora_kernels.lora_linear(x, w, None, a, b, 1.0, backend="cuda")


@pytest.mark.parametrize("plan", ["fused", "cublas"])
def test_torch_compile_fullgraph_traces_both_directions(plan):
    """torch.compile(fullgraph=True) over the backend's op on meta tensors (no device: the fake impls run): no graph
    break, the forward graph holds cuda_lora_fwd and the backward graph cuda_lora_bwd, both with the plan."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from lora_kernels.backends.base import LoRAOpts

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    def f(x, w, b, a, bb):
        return ops.CUDA_OP.apply(x, w, b, a, bb, None, LoRAOpts(2.0, 0.1, seed=3), plan).float().sum()

    x, w, b, a, bb = _fake_inputs(device="meta")
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    compiled(x, w, b, a, bb).backward()
    torch._dynamo.reset()
    assert len(graphs) == 2 and x.grad.shape == x.shape and a.grad.shape == a.shape and bb.grad.shape == bb.shape
    fwd_code, bwd_code = graphs
    assert "lora_kernels.cuda_lora_fwd" in fwd_code and f"'{plan}'" in fwd_code
    assert "lora_kernels.cuda_lora_bwd" in bwd_code and f"'{plan}'" in bwd_code
