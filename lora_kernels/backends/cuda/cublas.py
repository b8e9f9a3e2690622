"""Plan ``cublas`` of the CUDA backend: ``lora_kernels._C_cublas`` (csrc/cublas_plan.cu, csrc/lt_gemm.cpp).

The two big GEMMs (``X·Wᵀ``, ``G·W``) run in cuBLASLt from C++, the rank-r term added right after each in one
pass over its output (``Y += b + s·(XA)Bᵀ``, resp. ``dX += s·((GB)A) ⊙ Z/(1-p)``: added after the GEMM, not
seeded under it with beta = 1, which would round the LoRA term first: csrc/cublas_plan.cu); the skinny parts
(``dropout(X)Aᵀ``, ``GB``, ``dA``, ``dB``, ``db``) are the module's own kernels, every reduction a fixed-order split sum (no atomics: the
gradients are bit-reproducible whatever ``deterministic`` says). One C++ call per direction issues every launch
(3 forward, up to 5 backward), with no host synchronisation and no allocation but the workspace passed in from
here (PyTorch's caching allocator), so a warmed-up call is CUDA-graph capturable.

The module links ``libcublasLt.so.<major>``. torch's CUDA wheels load it already; otherwise :func:`load` makes the
one of the installed ``nvidia-cublas`` wheel resident (ctypes, RTLD_GLOBAL) and imports again. A module that
cannot load is never an import error of ``lora_kernels``: :func:`load` returns the reason and the plan raises
:class:`~lora_kernels.backends.base.BackendUnavailableError` with it.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import re

import torch

from ..base import BackendUnavailableError
from ..opdef import grad_layout
from .common import dropout_args, ptr, stream
from .native import _DTYPE_CODES

MAX_RANK = 64
BUILD_HINT = (
    "build it with `LORA_KERNELS_CUDA_ARCHS=90 python setup.py build_ext --inplace` with cuBLASLt headers and "
    "library present (`pip install nvidia-cublas`, or LORA_KERNELS_CUBLAS_ROOT=<dir with include/ and lib/>)"
)

_module = None
_error: str | None = None


def cublaslt_candidates(soname: str) -> list[str]:
    """Where an installed wheel or toolkit keeps ``soname`` (e.g. ``libcublasLt.so.13``): nvidia/cu13/lib (the
    CUDA 13 wheels), nvidia/cublas/lib (CUDA 12), $CUDA_HOME/lib64."""
    dirs = []
    try:
        import nvidia  # namespace package of NVIDIA's PyPI wheels

        for base in nvidia.__path__:
            dirs += [os.path.join(base, "cu13", "lib"), os.path.join(base, "cublas", "lib")]
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            dirs += [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    return [p for p in (os.path.join(d, soname) for d in dirs) if os.path.isfile(p)]


def _preload(message: str) -> str | None:
    """Make the library named in an ImportError resident; the path loaded, or None."""
    found = re.search(r"(libcublasLt\.so\.\d+)", message)
    if not found:
        return None
    for path in cublaslt_candidates(found.group(1)):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    return None


def load():
    """``(module or None, reason)``: ``lora_kernels._C_cublas``, imported once. Touches no CUDA API."""
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("lora_kernels._C_cublas")
        except ImportError as exc:
            loaded = _preload(str(exc))
            if loaded is None:
                _error = f"lora_kernels._C_cublas does not load ({exc})"
            else:
                try:
                    _module = importlib.import_module("lora_kernels._C_cublas")
                except ImportError as exc2:
                    _error = f"lora_kernels._C_cublas does not load even with {loaded} preloaded ({exc2})"
    return _module, _error


def availability() -> tuple[bool, str]:
    mod, err = load()
    if mod is None:
        return False, f"{err}: {BUILD_HINT}"
    return True, mod.cublaslt_info()


def supports(r: int) -> tuple[bool, str]:
    """Whether this plan can run a call of rank ``r`` that the backend accepted (device, dtype, r <= 256, sm_80+)."""
    ok, why = availability()
    if not ok:
        return False, why
    if r > MAX_RANK:
        return False, f"plan 'cublas' supports ranks r <= {MAX_RANK}, got r={r} (plan 'fused' takes up to 256)"
    return True, "cuBLASLt GEMMs + rank-r kernels"


def _require():
    mod, err = load()
    if mod is None:
        raise BackendUnavailableError(f"cuda plan 'cublas' is unavailable: {err}: {BUILD_HINT}")
    return mod


def _rows(t2: torch.Tensor) -> torch.Tensor:
    """``t2 [L, C]`` with unit inner stride and a row stride >= C (what cuBLASLt takes), copied only otherwise
    (e.g. ``x.t()``, an expanded gradient)."""
    if t2.stride(1) == 1 and (t2.shape[0] <= 1 or t2.stride(0) >= t2.shape[1]):
        return t2
    return t2.contiguous()


def _ld(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _workspace(nbytes: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Scratch from the caching allocator and its first 256-byte aligned address (the binding requires it; CUDA
    blocks are 512-byte aligned already, the slack covers other allocators)."""
    ws = torch.empty(nbytes + 256, dtype=torch.uint8, device=device)
    return ws, (ws.data_ptr() + 255) & ~255


def forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset):
    C = _require()
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    x2 = _rows(x.reshape(-1, k))
    m, dev = x2.shape[0], x.device
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    xa = torch.empty(m, r, dtype=torch.float32, device=dev)
    if m > 0:
        weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
        ws_bytes = C.fwd_workspace_bytes(m, n, k, r)
        ws, ws_ptr = _workspace(ws_bytes, dev)
        C.fwd(
            x=x2.data_ptr(), stride_x_m=_ld(x2), weight=weight.data_ptr(),
            bias=ptr(bias.contiguous() if bias is not None else None), lora_a=lora_A.data_ptr(),
            lora_b=lora_B.data_ptr(), y=y.data_ptr(), xa=xa.data_ptr(), workspace=ws_ptr,
            workspace_bytes=ws_bytes, M=m, N=n, K=k, r=r, act_dtype=_DTYPE_CODES[x.dtype],
            adapter_dtype=_DTYPE_CODES[lora_A.dtype], scale=scale, **dropout_args(dropout_p, seed, offset),
            device=dev.index or 0, stream=stream(dev),
        )  # fmt: skip
    return y.view(*x.shape[:-1], n), xa


def backward(g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset, need_dx, need_da, need_db,
             need_dbias, need_dr, deterministic):  # fmt: skip
    """``deterministic`` changes nothing here: every reduction of this plan is a fixed-order sum."""
    C = _require()
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    m, dev = xa.shape[0], x.device
    off_da, off_db, off_dbias, _, length = grad_layout(r, k, n, need_da, need_db, need_dbias, False)
    dx = torch.empty(x.shape if need_dx else (0,), dtype=x.dtype, device=dev)
    flat = torch.empty(length, dtype=torch.float32, device=dev)  # every segment is written by the reduce launch
    if m == 0:
        return dx, flat.zero_()
    if not (need_dx or length):
        return dx, flat
    g2 = _rows(g.reshape(-1, n))
    if g2.dtype != x.dtype:
        g2 = g2.to(x.dtype)
    x2 = _rows(x.reshape(-1, k))
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    ws_bytes = C.bwd_workspace_bytes(m, n, k, r)
    ws, ws_ptr = _workspace(ws_bytes, dev)
    C.bwd(
        grad_y=g2.data_ptr(), stride_g_m=_ld(g2), x=x2.data_ptr(), stride_x_m=_ld(x2), weight=weight.data_ptr(),
        lora_a=lora_A.data_ptr(), lora_b=lora_B.data_ptr(), xa=xa.data_ptr(), grad_x=dx.data_ptr() if need_dx else 0,
        grad_flat=flat.data_ptr() if length else 0, grad_flat_len=length, off_da=off_da, off_db=off_db,
        off_dbias=off_dbias, workspace=ws_ptr, workspace_bytes=ws_bytes, M=m, N=n, K=k, r=r,
        act_dtype=_DTYPE_CODES[x.dtype], adapter_dtype=_DTYPE_CODES[lora_A.dtype], scale=scale,
        **dropout_args(dropout_p, seed, offset), device=dev.index or 0, stream=stream(dev),
    )  # fmt: skip
    return dx, flat
