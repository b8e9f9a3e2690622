"""Plan ``cublas`` of the CUDA backend run on the CPU: csrc/cublas_plan.cu, binding_cublas.cpp and lora_api.cu
compiled as host C++ under the CUDA emulation of csrc/emu/lora_emu.h (CTAs one after another, a CTA's threads as
std::threads sharing its shared memory, __syncthreads as a barrier, warp MMAs in the fp32 lane scheme for every
dtype, cuBLASLt replaced by a host GEMM with the same column-major contract). Host pointers stand in for device
pointers, so the Python plan (lora_kernels/backends/cuda/cublas.py) and the op contract run unchanged on CPU
tensors.

What this verifies without a GPU: the kernels' index arithmetic, tails, dropout masks, K- and M-splits and their
fixed-order reductions, operand rounding, the workspace carving and the GEMM operand mapping, against the fp64
torch oracle with the suite's rule (error <= 2x torch's own error in the same dtypes). What it cannot: WMMA
fragments, races, timing, cuBLASLt itself (tests/test_cuda_cublas.py does those on a GPU).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from helpers import assert_close_to_oracle, make_lora_inputs

from lora_kernels.backends.base import LoRAOpts
from lora_kernels.backends.cuda import cublas
from lora_kernels.backends.cuda.ops import CUDA_OP
from lora_kernels.backends.torch import lora as torch_lora

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/cublas_plan.cu", "csrc/lora_api.cu", "csrc/binding_cublas.cpp", "csrc/emu/emu_runtime.cpp",
           "csrc/emu/lt_gemm_emu.cpp"]  # fmt: skip
HEADERS = ["csrc/cublas_plan.h", "csrc/lt_gemm.h", "csrc/lora_api.h", "csrc/lora_common.cuh", "csrc/lora_rng.cuh",
           "csrc/emu/lora_emu.h"]  # fmt: skip


def _cuda_include() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "include" / "cuda_fp16.h").is_file():
            return str(Path(cand) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(nvcc).resolve().parents[1] / "include"
        if (inc / "cuda_fp16.h").is_file():
            return str(inc)
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulated ``_C_cublas`` module, built once per session (~15 s of g++; cached by source hash)."""
    gxx, inc = shutil.which("g++"), _cuda_include()
    if gxx is None or inc is None:
        pytest.skip("the emulation build needs g++ and the CUDA headers (cuda_fp16.h)")
    pybind11 = pytest.importorskip("pybind11")
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in SOURCES + HEADERS)).hexdigest()[:16]
    out_dir = Path(os.environ.get("LORA_KERNELS_EMU_DIR", tmp_path_factory.getbasetemp() / "emu")) / digest
    so = out_dir / ("_C_cublas" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DLORA_EMULATE",
               '-DLORA_KERNELS_CUDA_ARCHS="emu"', f"-I{ROOT / 'csrc'}", f"-I{inc}",
               f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
               "-x", "c++", str(ROOT / SOURCES[0]), str(ROOT / SOURCES[1]), "-x", "none",
               *(str(ROOT / f) for f in SOURCES[2:]), "-o", str(so)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("_C_cublas", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.cublaslt_info().startswith("emulated")
    return mod


@pytest.fixture
def plan(emu, monkeypatch):
    """Plan ``cublas``'s Python code bound to the emulated module (CPU tensors, stream 0)."""
    monkeypatch.setattr(cublas, "_require", lambda: emu)
    monkeypatch.setattr(cublas, "stream", lambda dev: 0)
    return emu


def run_op(x, w, b, a, bb, p, seed, g, grads, deterministic=False):
    """Forward + backward through the op contract's eager Function with plan ``cublas`` (what apply() runs)."""
    x = x.detach().requires_grad_("x" in grads)
    b = None if b is None else b.detach().requires_grad_("b" in grads)
    a = a.detach().requires_grad_("A" in grads)
    bb = bb.detach().requires_grad_("B" in grads)
    y = CUDA_OP.function.apply(x, w, b, a, bb, None, 2.0, p, seed, 3, deterministic, "cublas")[0]
    out = {"y": y.detach()}
    inputs = {"x": x, "b": b, "A": a, "B": bb}
    wanted = [nm for nm in grads if inputs[nm] is not None]
    if wanted:
        res = torch.autograd.grad(y, [inputs[nm] for nm in wanted], g)
        out.update({"d" + nm: t for nm, t in zip(wanted, res)})
    return out


def run_torch(x, w, b, a, bb, p, seed, g, grads):
    x = x.detach().requires_grad_("x" in grads)
    b = None if b is None else b.detach().requires_grad_("b" in grads)
    a = a.detach().requires_grad_("A" in grads)
    bb = bb.detach().requires_grad_("B" in grads)
    y = torch_lora.apply(x, w, b, a, bb, None, LoRAOpts(scale=2.0, dropout_p=p, seed=seed, offset=3))
    out = {"y": y.detach()}
    inputs = {"x": x, "b": b, "A": a, "B": bb}
    wanted = [nm for nm in grads if inputs[nm] is not None]
    if wanted:
        res = torch.autograd.grad(y, [inputs[nm] for nm in wanted], g.to(y.dtype))
        out.update({"d" + nm: t for nm, t in zip(wanted, res)})
    return out


def check(x, w, b, a, bb, p=0.0, seed=5, grads=("x", "b", "A", "B"), g=None):
    if g is None:
        gen = torch.Generator().manual_seed(1)
        g = torch.randn((*x.shape[:-1], w.shape[0]), generator=gen).to(x.dtype)
    out = run_op(x, w, b, a, bb, p, seed, g, grads)
    up = [None if t is None else t.double() for t in (x, w, b, a, bb)]
    ref = run_torch(*up, p, seed, g.double(), grads)
    tor = run_torch(x, w, b, a, bb, p, seed, g, grads)
    assert out.keys() == ref.keys()
    for name in out:
        assert out[name].dtype == tor[name].dtype and out[name].shape == tor[name].shape, name
        atol = 1e-6 * max(ref[name].abs().max().item() if ref[name].numel() else 0.0, 1.0)
        assert_close_to_oracle(out[name], ref[name], tor[name], name, atol=atol)
    return out


CASES = [  # (M, K, N, r): odd sizes; K- and M-splits > 1; r not a multiple of 16; r = 64 (the plan's limit)
    pytest.param(1, 40, 72, 1, id="M1-K40-N72-r1"),
    pytest.param(7, 300, 90, 3, id="M7-K300-N90-r3-ksplit3"),
    pytest.param(129, 257, 130, 16, id="M129-K257-N130-r16"),
    pytest.param(300, 72, 136, 5, id="M300-K72-N136-r5-msplit3"),
    pytest.param(33, 65, 300, 64, id="M33-K65-N300-r64"),
]
DTYPES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters"),
    pytest.param(torch.float16, torch.float16, id="fp16-fp16adapters"),
]


@pytest.mark.parametrize("m,k,n,r", CASES)
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_matches_oracle(plan, dtype, adapter_dtype, m, k, n, r):
    check(*make_lora_inputs(m, k, n, r, dtype, adapter_dtype=adapter_dtype), p=0.0)


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_dropout_matches_oracle(plan, dtype, adapter_dtype):
    """The mask of lora_kernels.backends.mask in X Aᵀ, the dX seed and dA (same (seed, offset) as the oracle)."""
    check(*make_lora_inputs(150, 136, 70, 6, dtype, adapter_dtype=adapter_dtype), p=0.3, seed=11)


def test_three_d_strided_and_partial_grads(plan):
    """3-D x, a row-strided x (row stride > K: passed through), a transposed x (copied), and each gradient alone."""
    x, w, b, a, bb = make_lora_inputs(0, 48, 40, 4, torch.bfloat16, adapter_dtype=torch.float32, lead=(3, 11))
    check(x, w, b, a, bb, p=0.1)
    wide = torch.randn(37, 80, dtype=torch.bfloat16)
    check(wide[:, 8:56], w, b, a, bb)  # stride (80, 1): rows read in place
    check(torch.randn(48, 37, dtype=torch.bfloat16).t(), w, None, a, bb)  # stride (1, 37): made contiguous
    for grads in (("x",), ("A",), ("B",), ("b",), ("A", "B")):
        check(x, w, b, a, bb, p=0.2, grads=grads)


def test_expanded_grad_and_zero_rows(plan):
    x, w, b, a, bb = make_lora_inputs(20, 40, 24, 3, torch.float32)
    check(x, w, b, a, bb, g=torch.ones(1, 1).expand(20, 24))  # stride-0 grad: copied to rows
    out = run_op(x[:0], w, b, a, bb, 0.0, 0, torch.zeros(0, 24), ("x", "b", "A", "B"))
    assert out["y"].shape == (0, 24) and float(out["dA"].abs().sum()) == 0.0 and float(out["db"].abs().sum()) == 0.0


def test_bit_reproducible_and_deterministic_flag_ignored(plan):
    """No atomics: two runs, and deterministic=True vs False, give identical bits."""
    x, w, b, a, bb = make_lora_inputs(200, 130, 70, 8, torch.bfloat16, adapter_dtype=torch.float32)
    g = torch.randn(200, 70).to(torch.bfloat16)
    r1 = run_op(x, w, b, a, bb, 0.1, 9, g, ("x", "b", "A", "B"))
    r2 = run_op(x, w, b, a, bb, 0.1, 9, g, ("x", "b", "A", "B"), deterministic=True)
    for name in r1:
        assert torch.equal(r1[name], r2[name]), name


def test_launch_counts(plan):
    """What one call issues (ours + cuBLASLt matmuls), as the GPU test counts it with the profiler."""
    assert plan.fwd_launches(0) == 0 and plan.fwd_launches(5) == 3
    assert plan.bwd_launches(5, True, True, True, True) == 5
    assert plan.bwd_launches(5, True, False, False, False) == 3  # GB, seed, GEMM
    assert plan.bwd_launches(5, False, False, True, False) == 2  # dB kernel, reduce
    assert plan.bwd_launches(0, True, True, True, True) == 0
