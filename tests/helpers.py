"""Test helpers: named skip reasons (no GPU / hardware too old / extension not built) and tolerance rules."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def requires_sm(major: int, minor: int = 0):
    ok = HAS_CUDA and torch.cuda.get_device_capability() >= (major, minor)
    return pytest.mark.skipif(not ok, reason=f"GPU too old: needs compute capability >= {major}.{minor}")


def _native_built() -> bool:
    try:
        import lora_kernels._C  # noqa: F401
    except ImportError:
        return False
    return True


requires_native = pytest.mark.skipif(not _native_built(), reason="native extension lora_kernels._C not built")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (0 when both are empty)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return 0.0 if ref.numel() == 0 else (out - ref).norm().item() / max(denom, 1e-300)


def assert_close_to_oracle(out, ref64, torch_out, name: str, factor: float = 2.0, atol: float = 1e-6):
    """The FlashAttention rule: |out - ref64| <= factor * |torch_out - ref64| + atol, in the max norm.

    ``ref64`` is the fp64 oracle, ``torch_out`` torch's own result in the same low-precision dtype, so the bound
    is derived from torch's error rather than picked by hand.
    """
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = (out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    base = (torch_out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    assert err <= factor * base + atol, f"{name}: max err {err:.3e} > {factor} x torch's {base:.3e} + {atol:.1e}"
