"""CPU-side checks of the CUDA backend: the built extension imports and fails cleanly without a GPU, the boundary
validates its arguments, the host copy of the kernels' dropout hash equals lora_kernels.backends.mask, and the backend
reports itself unavailable with the reason. CI builds the extension first (`python setup.py build_ext --inplace`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HAS_CUDA, requires_native

import lora_kernels
from lora_kernels.backends import mask as _rng
from lora_kernels.backends.cuda import backend as cuda_backend

ROOT = Path(__file__).resolve().parents[1]

# Valid-looking (non-null, 16-byte aligned) fake device addresses: the boundary accepts them, the device check
# then refuses the call because this machine has no GPU.
FAKE = 1 << 20


def _fwd_kwargs(**over):
    kw = dict(
        x=FAKE,
        stride_x_m=64,
        stride_x_k=1,
        weight=FAKE,
        bias=0,
        lora_a=FAKE,
        lora_b=FAKE,
        y=FAKE,
        xa=FAKE,
        M=7,
        N=48,
        K=64,
        r=4,
        act_dtype=2,
        adapter_dtype=0,
        scale=2.0,
        dropout=False,
        seed=0,
        offset=0,
        threshold=0,
        inv_keep=1.0,
        device=0,
        stream=0,
    )
    kw.update(over)
    return kw


def _bwd_kwargs(**over):
    kw = dict(
        grad_y=FAKE,
        stride_g_m=48,
        stride_g_n=1,
        x=FAKE,
        stride_x_m=64,
        stride_x_k=1,
        weight=FAKE,
        lora_a=FAKE,
        lora_b=FAKE,
        xa=FAKE,
        grad_x=FAKE,
        grad_a=FAKE,
        grad_b=FAKE,
        grad_bias=0,
        workspace=FAKE,
        workspace_bytes=1 << 30,
        M=7,
        N=48,
        K=64,
        r=4,
        act_dtype=1,
        adapter_dtype=1,
        scale=2.0,
        dropout=True,
        seed=1,
        offset=0,
        threshold=1 << 31,
        inv_keep=2.0,
        deterministic=False,
        device=0,
        stream=0,
    )
    kw.update(over)
    return kw


@requires_native
def test_extension_imports_and_describes_itself():
    import lora_kernels._C as C

    assert C.MAX_RANK == cuda_backend.MAX_RANK
    assert dict(C.DTYPE_CODES) == {str(k).removeprefix("torch."): v for k, v in cuda_backend._DTYPE_CODES.items()}
    info = C.runtime_info()
    assert "cudart" in info and "sm_" in info


@requires_native
def test_kernel_policy_is_reported():
    """The default main loop is named by the build; last_path() answers before any call (no CUDA touched)."""
    import lora_kernels._C as C

    assert C.DEFAULT_KERNEL in ("pipelined", "simple")
    path = cuda_backend.last_path()
    assert set(path) == {"fwd", "bwd"} and all(isinstance(v, str) for v in path.values())


@requires_native
@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
@pytest.mark.parametrize("policy", ["simple", "pipelined"])
def test_policy_env_without_gpu_raises_clean_error(monkeypatch, policy):
    """Either policy: the no-GPU error comes first and names the call (the policy is read at launch)."""
    import lora_kernels._C as C

    monkeypatch.setenv("LORA_KERNELS_CUDA_KERNEL", policy)
    with pytest.raises(RuntimeError, match="lora_fwd: no usable CUDA device"):
        C.lora_fwd(**_fwd_kwargs())


@requires_native
@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
@pytest.mark.parametrize("call", ["lora_fwd", "lora_bwd"])
def test_call_without_gpu_raises_clean_error(call):
    import lora_kernels._C as C

    kwargs = _fwd_kwargs() if call == "lora_fwd" else _bwd_kwargs()
    with pytest.raises(RuntimeError, match=rf"lora_kernels\._C\.{call}: no usable CUDA device"):
        getattr(C, call)(**kwargs)


@requires_native
@pytest.mark.parametrize(
    "over, match",
    [
        (dict(x=0), r"lora_fwd: x must be a non-null device pointer"),
        (dict(weight=FAKE + 1), r"weight .* must be aligned to its element size \(2 bytes\)"),
        (dict(xa=FAKE + 2), r"xa .* must be aligned to its element size \(4 bytes\)"),
        (dict(r=0), r"r \(LoRA rank\) must be in \[1, 256\], got 0"),
        (dict(r=257), r"r \(LoRA rank\) must be in \[1, 256\], got 257"),
        (dict(K=0), r"K \(in_features\) must be >= 1"),
        (dict(M=-1), r"M \(rows of x\) must be >= 0"),
        (dict(act_dtype=7), r"act_dtype must be a dtype code 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 7"),
        (dict(act_dtype=1, adapter_dtype=2), r"adapter_dtype must be 0 \(float32\) or equal to act_dtype"),
        (dict(stride_x_k=-1), r"stride_x_k must be >= 0"),
        (dict(scale=float("nan")), r"scale must be finite"),
        (dict(dropout=True, inv_keep=0.5), r"inv_keep .* must be a finite float >= 1"),
        (dict(threshold=1 << 32), r"threshold must fit in 32 bits"),
    ],
)
def test_fwd_boundary_names_the_bad_argument(over, match):
    import lora_kernels._C as C

    with pytest.raises(ValueError, match=match):
        C.lora_fwd(**_fwd_kwargs(**over))


@requires_native
@pytest.mark.parametrize(
    "over, match",
    [
        (dict(grad_y=0), r"lora_bwd: grad_y must be a non-null device pointer"),
        (dict(grad_a=0), r"grad_a must be a non-null device pointer"),
        (dict(workspace_bytes=16), r"workspace_bytes must be >= bwd_workspace_bytes"),
        (dict(stride_g_m=-3), r"stride_g_m must be >= 0"),
        (dict(adapter_dtype=2), r"adapter_dtype must be 0 \(float32\) or equal to act_dtype"),
    ],
)
def test_bwd_boundary_names_the_bad_argument(over, match):
    import lora_kernels._C as C

    with pytest.raises(ValueError, match=match):
        C.lora_bwd(**_bwd_kwargs(**over))


@requires_native
def test_workspace_sizes():
    import lora_kernels._C as C

    m, n, k, r = 8192, 4096, 4096, 16
    # deterministic: one fp32 partial slice of dA, dB, db per 64-row tile
    assert C.bwd_workspace_bytes(m, n, k, r, True) == 4 * (m // 64) * (r * k + n * r + n)
    # atomic: one fp32 accumulator each plus one uint32 counter per dA column tile (128) and dB row chunk (32)
    assert C.bwd_workspace_bytes(m, n, k, r, False) == 4 * (r * k + n * r + n + k // 128 + n // 32)


@requires_native
@pytest.mark.parametrize(
    "seed, offset, m, k, p",
    [(0, 0, 7, 33, 0.1), (12345, 17, 5, 129, 0.5), (2**40 + 3, 2**32 - 50, 3, 41, 0.3), (2**63 - 1, 0, 2, 9, 0.9)],
)
def test_kernel_dropout_hash_matches_rng(seed, offset, m, k, p):
    """csrc/lora_rng.cuh evaluated on the host equals the package's mask definition bit for bit."""
    import lora_kernels._C as C

    thr = _rng.keep_threshold(p)
    got = torch.frombuffer(bytearray(C.dropout_keep_mask_host(seed, offset, m, k, thr)), dtype=torch.uint8)
    want = _rng.dropout_keep_mask(seed, offset, m, k, p)
    assert torch.equal(got.view(m, k).bool(), want)


def test_availability_reports_missing_build(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_load_native", lambda: (None, "No module named 'lora_kernels._C'"))
    ok, why = cuda_backend.availability()
    assert not ok and why.startswith("lora_kernels._C not built: build it with")


@requires_native
@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU reason")
def test_availability_without_gpu():
    assert cuda_backend.availability() == (False, "no CUDA device")
    info = lora_kernels.backend_info()["backends"]["cuda"]
    assert info == {"available": False, "reason": "no CUDA device"}


def test_supports_refuses_cpu_tensors_and_explicit_choice_raises():
    x = torch.randn(3, 8)
    w, a, b = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    opts = lora_kernels.LoRAOpts(scale=1.0)
    ok, why = cuda_backend.supports(x, w, None, a, b, None, opts)
    assert not ok and "CUDA tensors" in why
    if not HAS_CUDA:
        with pytest.raises(lora_kernels.BackendUnavailableError, match="backend 'cuda' cannot run this call"):
            lora_kernels.lora_linear(x, w, None, a, b, 1.0, backend="cuda")


def test_import_is_lean():
    """`import lora_kernels` (and the cuda backend's registration) never loads the native module."""
    code = "import sys, lora_kernels; lora_kernels.backend_info; assert 'lora_kernels._C' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_setup_skip_flag_prints_one_line_and_builds_no_extension():
    env = dict(os.environ, LORA_KERNELS_SKIP_CUDA="1")
    out = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "lora_kernels: LORA_KERNELS_SKIP_CUDA=1, installing without lora_kernels._C"
    assert out[-1] == "lora_kernels"
