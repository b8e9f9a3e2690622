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


# ------------------------------------------------------------------------------ LoRA inputs and oracle checks
# Shared by the kernel suites (tests/test_triton_kernels.py, tests/test_cuda_kernels.py): the same inputs, the same
# forward + backward driver and the same fp64 / same-dtype-torch comparison for every backend.
def make_lora_inputs(m, k, n, r, dtype, adapter_dtype=None, bias=True, device="cpu", lead=None, seed=0):
    """x [*lead, k] (lead defaults to (m,)), base layer, adapters with a non-zero B (so the LoRA term counts);
    fp32-scale values typical of a LoRA layer."""
    g = torch.Generator().manual_seed(seed)
    lead = (m,) if lead is None else lead
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)

    x = rnd(*lead, k)
    w = rnd(n, k, std=k**-0.5)
    b = rnd(n, std=0.1) if bias else None
    a = rnd(r, k, std=k**-0.5, dt=adapter_dtype)
    bb = rnd(n, r, std=r**-0.5, dt=adapter_dtype)
    return x, w, b, a, bb


def run_lora(backend, x, w, b, a, bb, scale=2.0, p=0.0, seed=7, grads=("x", "b", "A", "B", "R"), g=None, rm=None, **kw):
    """Forward + backward through lora_linear (``rm``: lora_R); returns {name: tensor} for y and each gradient."""
    from lora_kernels.functional import lora_linear

    x = x.detach().requires_grad_("x" in grads)
    w = w.detach().requires_grad_("W" in grads)
    b = None if b is None else b.detach().requires_grad_("b" in grads)
    a = a.detach().requires_grad_("A" in grads)
    bb = bb.detach().requires_grad_("B" in grads)
    rm = None if rm is None else rm.detach().requires_grad_("R" in grads)
    y = lora_linear(x, w, b, a, bb, scale, p, seed=seed, backend=backend, lora_R=rm, **kw)
    out = {"y": y.detach()}
    inputs = {"x": x, "W": w, "b": b, "A": a, "B": bb, "R": rm}
    wanted = [nm for nm in grads if inputs[nm] is not None]
    if wanted:
        gy = g if g is not None else torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        res = torch.autograd.grad(y, [inputs[nm] for nm in wanted], gy.to(y.dtype))
        out.update({"d" + nm: t for nm, t in zip(wanted, res)})
    return out


def check_backend_against_oracle(backend, x, w, b, a, bb, atol_rel=1e-6, rm=None, g=None, **kw):
    """``backend``'s result vs the fp64 torch evaluation, bound from torch's own error in the same dtypes."""
    if g is None:
        gen = torch.Generator().manual_seed(1)
        g = torch.randn((*x.shape[:-1], w.shape[0]), generator=gen).to(device=x.device, dtype=x.dtype)
    out = run_lora(backend, x, w, b, a, bb, g=g, rm=rm, **kw)
    rm64 = None if rm is None else rm.double()
    up = (t.double() if t is not None else None for t in (x, w, b, a, bb))
    ref = run_lora("torch", *up, g=g.double(), rm=rm64, **kw)
    tor = run_lora("torch", x, w, b, a, bb, g=g, rm=rm, **kw)
    assert out.keys() == ref.keys()
    for name in out:
        assert out[name].dtype == tor[name].dtype and out[name].shape == tor[name].shape, name
        atol = atol_rel * max(ref[name].abs().max().item() if ref[name].numel() else 0.0, 1.0)
        assert_close_to_oracle(out[name], ref[name], tor[name], name, atol=atol)
    return out
