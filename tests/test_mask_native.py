"""One dropout mask for every backend (issue 15): the torch oracle (``mask.dropout_keep_mask``), its int32 variant
(``keep_mask_fast``), the fused native CPU pass (``lora_kernels._cpu``) and the Triton kernels (interpreter on CPU)
draw the same bits from ``(seed, offset, index)``, forward and backward agree, the mask is never saved, and the
native pass's absence is reported, not silent."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

import pytest
import torch
from helpers import HAS_TRITON

import lora_kernels
from lora_kernels.backends import mask as _mask
from lora_kernels.backends.torch import dropout as _dropout
from lora_kernels.backends.torch import native
from lora_kernels.functional import lora_linear

# (seed, offset, m, k, p): odd shapes; counters crossing a 2**32 boundary (the hash's high word changes inside a row);
# seeds using the high 32 bits; p at the ends of its range.
CASES = [
    (12345, 0, 7, 13, 0.1),
    (2**40 + 3, 2**32 - 40, 5, 19, 0.5),
    (2**62 + 11, 3 * 2**32 + 5, 3, 33, 0.05),
    (9, 2**33 - 1, 1, 1, 0.999),
    (0, 17, 4, 6, 0.0),
]


def _native_or_skip():
    ok, why = native.status()
    if not ok:
        pytest.skip(f"native CPU pass unavailable: {why}")
    return native.module()


def _python_mask(seed, offset, m, k, p) -> torch.Tensor:
    """The definition in mask.py's docstring, element by element in plain Python ints."""
    key_lo, key_hi = _mask.launch_keys(seed)
    thr = _mask.keep_threshold(p)
    out = []
    for i in range(m * k):
        c = offset + i
        out.append(_mask.mix32_int(_mask.mix32_int((c & _mask.M32) ^ key_lo) ^ (c >> 32) ^ key_hi) >= thr)
    return torch.tensor(out, dtype=torch.bool).view(m, k)


def _digest(keep: torch.Tensor) -> str:
    return hashlib.sha256("".join("1" if v else "0" for v in keep.flatten().tolist()).encode()).hexdigest()[:16]


# sha256 prefixes of the masks of CASES[:3] as lora_kernels computed them before issue 15 (mask.py at e9f0053).
GOLDEN = {CASES[0]: "8e8b57a50db8f5e3", CASES[1]: "6f2c263575324bb6", CASES[2]: "3d4f357548797e8a"}


@pytest.mark.parametrize("case", CASES)
def test_every_cpu_mask_is_the_same_function_of_seed_offset_index(case):
    ref = _python_mask(*case)
    assert torch.equal(_mask.dropout_keep_mask(*case), ref)
    assert torch.equal(_mask.keep_mask_fast(*case), ref)
    if case in GOLDEN:
        assert _digest(ref) == GOLDEN[case], "the mask definition changed"
    lib = _native_or_skip()
    seed, offset, m, k, p = case
    raw = lib.keep_mask(seed, offset, m, k, _mask.keep_threshold(p), 2)
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(m, k).bool(), ref)


def test_fast_mask_chunking_and_low_word_wrap_are_invisible(monkeypatch):
    seed, offset, m, k, p = 2**40 + 7, 2**32 - 50, 9, 23, 0.3
    ref = _mask.dropout_keep_mask(seed, offset, m, k, p)
    monkeypatch.setattr(_mask, "_CHUNK_ELEMS", 10)  # many chunks, a ragged last one, one crossing 2**32
    assert torch.equal(_mask.keep_mask_fast(seed, offset, m, k, p), ref)


def _read_masks(backend, x_shape, p, seed, offset):
    """Forward and backward keep-masks of one call, read back through its outputs: W = 0, A = B = I (r = K = N),
    scale 1, so Y = Z / (1-p) exactly and, with dY = 1, dX = Z / (1-p). Both are regenerated, neither stored."""
    k = x_shape[-1]
    x = torch.ones(x_shape, requires_grad=True)
    eye = torch.eye(k)
    y = lora_linear(x, torch.zeros(k, k), None, eye, eye.clone(), 1.0, p, True, seed=seed, offset=offset,
                    backend=backend)  # fmt: skip
    y.backward(torch.ones_like(y))
    return (y != 0).reshape(-1, k), (x.grad != 0).reshape(-1, k)


CPU_PATHS = ["native", "torch-ops", "native-chunked", "torch-ops-chunked"]


@pytest.fixture
def cpu_path(request, monkeypatch):
    """Run the torch backend's CPU dropout through one path: the native pass or torch ops, one chunk or many."""
    name = request.param
    if name.startswith("native"):
        _native_or_skip()
    else:
        monkeypatch.setenv(native.DISABLE_ENV, "1")
        native.reset()
    if name.endswith("chunked"):
        monkeypatch.setattr(_dropout, "CPU_CHUNK_BYTES", 4 * 13 * 3)  # 3 rows of K = 13 per chunk, ragged last
    yield name
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    native.reset()


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("x_shape", [(7, 13), (2, 4, 13)])
def test_torch_backend_forward_and_backward_masks_equal_the_oracle(cpu_path, x_shape):
    seed, offset, p = 2**40 + 3, 2**32 - 40, 0.4
    fwd, bwd = _read_masks("torch", x_shape, p, seed, offset)
    ref = _mask.dropout_keep_mask(seed, offset, fwd.shape[0], fwd.shape[1], p)
    assert torch.equal(fwd, ref) and torch.equal(bwd, ref)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="no GPU, no interpreter"
)
@pytest.mark.parametrize("x_shape", [(7, 13), (2, 4, 13)])
def test_triton_kernels_draw_the_torch_mask(x_shape):
    seed, offset, p = 2**40 + 3, 2**32 - 40, 0.4
    fwd, bwd = _read_masks("triton", x_shape, p, seed, offset)
    ref = _mask.dropout_keep_mask(seed, offset, fwd.shape[0], fwd.shape[1], p)
    assert torch.equal(fwd, ref) and torch.equal(bwd, ref)


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_an_explicit_mask_in_fp64(cpu_path, dtype):
    """y, dX, dA, dB of the torch backend (3-D, non-contiguous x) against fp64 with the oracle's mask: within 2x
    the same formulas' error when computed by torch in ``dtype`` with that explicit mask."""
    g = torch.Generator().manual_seed(3)
    m, k, n, r, p, s, seed = 10, 13, 11, 5, 0.3, 0.7, 99
    x0 = torch.randn(2, k, m // 2, generator=g).to(dtype).transpose(1, 2)  # [2, 5, 13], not contiguous
    w = torch.randn(n, k, generator=g).to(dtype)
    a, b = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    gy = torch.randn(2, m // 2, n, generator=g).to(dtype)
    z = _mask.dropout_keep_mask(seed, 0, m, k, p).view(2, m // 2, k)

    def explicit(dt):
        x, aa, bb = (t.detach().to(dt).requires_grad_() for t in (x0, a, b))
        y = x @ w.to(dt).t() + s * ((x * z / (1 - p)) @ aa.t()) @ bb.t()
        y.backward(gy.to(dt))
        return [t.double() for t in (y, x.grad, aa.grad, bb.grad)]

    x, aa, bb = (t.detach().clone().requires_grad_() for t in (x0, a, b))
    y = lora_linear(x, w, None, aa, bb, s, p, True, seed=seed, backend="torch")
    y.backward(gy)
    ours = [t.double() for t in (y, x.grad, aa.grad, bb.grad)]
    ref, same_dtype = explicit(torch.float64), explicit(dtype if dtype == torch.float32 else torch.float32)
    for name, o, r64, t in zip(("y", "dX", "dA", "dB"), ours, ref, same_dtype):
        bound = 2 * (t - r64).abs().max().item() + 4 * torch.finfo(dtype).eps * r64.abs().max().item()
        assert (o - r64).abs().max().item() <= bound, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_native_pass_values_are_the_torch_ops_bits(dtype):
    """dropout_forward / dropout_backward produce exactly what the torch-op path computes (incl. inf / NaN inputs
    and a strided x): x ⊙ Z / (1-p) in x's dtype, and dx + alpha·(t ⊙ Z)."""
    lib = _native_or_skip()
    g = torch.Generator().manual_seed(1)
    m, k, seed, offset, p = 6, 37, 2**40 + 3, 2**32 - 100, 0.3
    big = torch.randn(m, 2 * k, generator=g).to(dtype)
    big[0, 0], big[1, 2], big[2, 4] = float("inf"), float("nan"), -float("inf")
    x = big[:, ::2]  # element stride 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    thr, inv = _mask.keep_threshold(p), 1.0 / (1.0 - p)
    keep = _mask.dropout_keep_mask(seed, offset, m, k, p)
    want_xd = _mask.apply_dropout(x, seed, offset, p, keep).to(acc)
    code = native.DTYPE_CODES[dtype]
    out = torch.empty(m, k, dtype=acc)
    lib.dropout_forward(
        x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(), k, m, k, code, seed, offset, thr, inv, 2
    )
    assert torch.equal(out.isnan(), want_xd.isnan()) and torch.equal(out.nan_to_num(), want_xd.nan_to_num())
    t = torch.randn(m, k, generator=g).to(dtype)
    dx = torch.randn(m, k, generator=g).to(dtype)
    alpha = 0.7 * inv
    want_dx = dx.clone().add_(t * keep, alpha=alpha)
    xd = torch.empty(m, k, dtype=acc)
    lib.dropout_backward(x.data_ptr(), x.stride(0), x.stride(1), xd.data_ptr(), k, t.data_ptr(), k, dx.data_ptr(),
                         k, m, k, code, seed, offset, thr, inv, alpha, 2)  # fmt: skip
    assert torch.equal(dx, want_dx)
    assert torch.equal(xd.isnan(), want_xd.isnan()) and torch.equal(xd.nan_to_num(), want_xd.nan_to_num())


def test_native_pass_rejects_bad_arguments_by_name():
    lib = _native_or_skip()
    x = torch.ones(2, 3)
    out = torch.empty(2, 3)
    args = [x.data_ptr(), 3, 1, out.data_ptr(), 3, 2, 3, 0, 1, 0, 0, 1.0, 1]
    for i, name, bad in ((7, "dtype", 9), (12, "nthreads", 0), (11, "scale", 0.5), (4, "stride_out_m", 1)):
        with pytest.raises(ValueError, match=name):
            lib.dropout_forward(*args[:i], bad, *args[i + 1 :])


@pytest.mark.parametrize("cpu_path", ["native", "native-chunked"], indirect=True)
def test_mask_is_never_saved(cpu_path):
    """Saved for backward: x itself, the parameters and XA ([M, r]); nothing else of M x K (no mask, no X ⊙ Z)."""
    m, k, n, r = 40, 13, 9, 3
    x = torch.randn(m, k, requires_grad=True)
    w, a, b = torch.randn(n, k), torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, w, None, a, b, 1.0, 0.2, True, seed=5, backend="torch")
    known = {t.untyped_storage().data_ptr() for t in (x, w, a, b)}
    extra = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in known]
    assert extra == [(m, r)], extra


def test_missing_native_pass_is_reported_and_results_do_not_change(monkeypatch, caplog):
    _native_or_skip()
    x = torch.randn(9, 13)
    w, a, b = torch.randn(7, 13), torch.randn(3, 13), torch.randn(7, 3)
    fast = lora_linear(x, w, None, a, b, 1.0, 0.3, True, seed=4, backend="torch")
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    native.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="lora_kernels"):
            slow = lora_linear(x, w, None, a, b, 1.0, 0.3, True, seed=4, backend="torch")
        assert any("torch int32 ops" in rec.message and native.DISABLE_ENV in rec.message for rec in caplog.records)
        assert (
            f"torch ops (disabled by {native.DISABLE_ENV}=1)"
            in lora_kernels.backend_info()["backends"]["torch"]["reason"]
        )
        torch.testing.assert_close(slow, fast, rtol=0, atol=0)  # the same mask and values; one-chunk GEMMs alike
    finally:
        monkeypatch.delenv(native.DISABLE_ENV)
        native.reset()


@pytest.mark.skipif(os.environ.get("LORA_KERNELS_SKIP_CPU") == "1", reason="LORA_KERNELS_SKIP_CPU=1")
def test_native_pass_is_built_where_a_compiler_is():
    """setup.py builds lora_kernels._cpu whenever a C++ compiler is found: an install that lost it fails here."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        pytest.skip("no C++ compiler on this machine")
    ok, why = native.status()
    assert ok, why


def test_draw_seed_is_randint_from_the_same_generator_state():
    torch.manual_seed(11)
    drawn = [_mask.draw_seed() for _ in range(4)]
    torch.manual_seed(11)
    assert drawn == [int(torch.randint(0, _mask.SEED_MAX, (1,), dtype=torch.int64).item()) for _ in range(4)]


def test_torch_compile_with_dropout_matches_eager_and_caches_stay_real():
    x = torch.randn(6, 13, requires_grad=True)
    w, a, b = torch.randn(7, 13), torch.randn(3, 13, requires_grad=True), torch.randn(7, 3, requires_grad=True)

    def f(x):
        return lora_linear(x, w, None, a, b, 1.0, 0.25, True, seed=8, backend="torch")

    y = torch.compile(f, backend="eager")(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    y_ref = f(x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    assert all(type(t) is torch.Tensor for t in _mask._iota_cache.values())
