"""The pure-PyTorch fused op (the ``torch`` backend): gradients, equality with the eager reference, dtypes,
memory (what is saved for backward), backend selection and argument validation."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_oracle

import lora_kernels
from lora_kernels.backends import BackendUnavailableError
from lora_kernels.backends import mask as _rng
from lora_kernels.functional import lora_linear, lora_linear_reference


def _inputs(m=7, k=33, n=65, r=3, dtype=torch.float64, adapter_dtype=None, bias=True, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=g) / k**0.5).to(adapter_dtype)
    bb = (torch.randn(n, r, generator=g) / r**0.5).to(adapter_dtype)
    return x, w, b, a, bb


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("with_r", [False, True], ids=["noR", "R"])
def test_gradcheck_fp64_all_inputs(bias, p, with_r):
    x, w, b, a, bb = _inputs(m=5, k=9, n=7, r=3, lead=(2,), bias=bias)
    rr = torch.randn(3, 3, dtype=torch.float64) if with_r else None
    tensors = [t.requires_grad_() for t in (x, w, b, a, bb, rr) if t is not None]

    def f(*ts):
        it = iter(ts)
        x_, w_ = next(it), next(it)
        b_ = next(it) if bias else None
        a_, bb_ = next(it), next(it)
        r_ = next(it) if with_r else None
        return lora_linear(x_, w_, b_, a_, bb_, 0.75, p, True, lora_R=r_, seed=1234, backend="torch")

    assert torch.autograd.gradcheck(f, tensors)


def test_only_needed_grads_are_computed_and_frozen_base_gets_none():
    x, w, b, a, bb = _inputs(dtype=torch.float32)
    a.requires_grad_()
    bb.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 2.0, backend="torch")
    y.sum().backward()
    assert w.grad is None and b.grad is None and x.grad is None
    assert a.grad is not None and bb.grad is not None


# ---------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 2)], ids=["2d", "3d", "4d"])
def test_matches_eager_reference_fp32(p, lead):
    x, w, b, a, bb = _inputs(dtype=torch.float32, lead=lead)
    ts = [t.requires_grad_() for t in (x, w, b, a, bb)]
    y = lora_linear(*ts, 0.5, p, True, seed=99, backend="torch")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ts, gy)
    ref_ts = [t.detach().clone().requires_grad_() for t in ts]
    y_ref = lora_linear_reference(*ref_ts, 0.5, p, True, seed=99)
    ref_grads = torch.autograd.grad(y_ref, ref_ts, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g1, g2 in zip("x w b A B".split(), grads, ref_grads):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_non_contiguous_input():
    x, w, b, a, bb = _inputs(m=33, k=7, dtype=torch.float32)
    xt = x.t().contiguous().t()  # same values, column-major: non-contiguous [33, 7]
    assert not xt.is_contiguous()
    xt.requires_grad_()
    y = lora_linear(xt, w, b, a, bb, 1.0, backend="torch")
    y_ref = lora_linear_reference(x, w, b, a, bb, 1.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert xt.grad.shape == xt.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("adapter_dtype", ["same", "fp32"])
def test_low_precision_within_derived_tolerance(dtype, adapter_dtype):
    """Our low-precision result vs the fp64 oracle must be within 2x of the eager composition's own error with
    every operand in the activation dtype (the precision contract: GEMM operands in the activation dtype, fp32
    accumulation), plus a small atol. PEFT's fp32-adapter path upcasts X to fp32 (an M x K copy) and is more
    precise on the adapter gradients; matching it is not the contract."""
    ad = torch.float32 if adapter_dtype == "fp32" else dtype
    x, w, b, a, bb = _inputs(m=129, k=65, n=97, r=16, dtype=dtype, adapter_dtype=ad, lead=(2,))
    ts = [t.requires_grad_() for t in (x, w, b, a, bb)]
    y = lora_linear(*ts, 2.0, backend="torch")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ts, gy)
    t64 = [t.detach().double().requires_grad_() for t in ts]
    y64 = lora_linear(*t64, 2.0, backend="torch")
    g64 = torch.autograd.grad(y64, t64, gy.double())
    # torch's own error: the unfused eager composition in the same dtypes
    te = [t.detach().to(dtype).requires_grad_() for t in ts]
    ye = lora_linear_reference(*te, 2.0)
    ge = torch.autograd.grad(ye, te, gy)
    assert y.dtype == dtype and grads[3].dtype == ad
    assert_close_to_oracle(y, y64, ye, "y", atol=1e-3)
    for name, g, gref, geager in zip("x w b A B".split(), grads, g64, ge):
        assert_close_to_oracle(g, gref, geager, f"d{name}", atol=1e-3)


def test_empty_batch():
    x, w, b, a, bb = _inputs(m=0, dtype=torch.float32)
    ts = [t.requires_grad_() for t in (x, w, b, a, bb)]
    y = lora_linear(*ts, 1.0, 0.1, True, backend="torch")
    assert y.shape == (0, w.shape[0])
    y.sum().backward()
    assert torch.count_nonzero(a.grad) == 0 and x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------- dropout
def test_dropout_same_seed_same_output_and_eval_has_no_dropout():
    x, w, b, a, bb = _inputs(dtype=torch.float32)
    y1 = lora_linear(x, w, b, a, bb, 1.0, 0.5, True, seed=7, backend="torch")
    y2 = lora_linear(x, w, b, a, bb, 1.0, 0.5, True, seed=7, backend="torch")
    y3 = lora_linear(x, w, b, a, bb, 1.0, 0.5, True, seed=8, backend="torch")
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    y_eval = lora_linear(x, w, b, a, bb, 1.0, 0.5, False, seed=7, backend="torch")
    assert torch.equal(y_eval, lora_linear(x, w, b, a, bb, 1.0, 0.0, True, backend="torch"))


def test_dropout_p0_is_bit_identical_to_no_dropout():
    x, w, b, a, bb = _inputs(dtype=torch.float32)
    assert torch.equal(
        lora_linear(x, w, b, a, bb, 1.0, 0.0, True, seed=3, backend="torch"),
        lora_linear(x, w, b, a, bb, 1.0, 0.0, False, backend="torch"),
    )


def test_dropout_keep_rate_within_binomial_bound():
    n, p = 200_000, 0.1
    keep = _rng.dropout_keep_mask(seed=12345, offset=0, m=200, k=1000, p=p)
    rate = keep.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, (rate, sigma)
    # different seeds and offsets give (nearly) independent masks
    other = _rng.dropout_keep_mask(seed=12346, offset=0, m=200, k=1000, p=p)
    agree = (keep == other).double().mean().item()
    expected = (1 - p) ** 2 + p**2
    assert abs(agree - expected) < 5 * (expected * (1 - expected) / n) ** 0.5


def test_dropout_mask_is_a_function_of_the_global_index():
    full = _rng.dropout_keep_mask(5, 0, 6, 10, 0.5)
    rows_3_to_5 = _rng.dropout_keep_mask(5, 30, 3, 10, 0.5)  # offset = 3 rows * K
    assert torch.equal(full[3:], rows_3_to_5)


def test_mix32_tensor_equals_scalar_version():
    xs = torch.tensor([0, 1, 2, 0xFFFFFFFF, 0x12345678, 0x80000000], dtype=torch.int64)
    assert _rng.mix32_tensor(xs).tolist() == [_rng.mix32_int(int(v)) for v in xs]


def test_seed_is_drawn_from_torch_generator():
    x, w, b, a, bb = _inputs(dtype=torch.float32)
    torch.manual_seed(0)
    y1 = lora_linear(x, w, b, a, bb, 1.0, 0.5, True, backend="torch")
    torch.manual_seed(0)
    y2 = lora_linear(x, w, b, a, bb, 1.0, 0.5, True, backend="torch")
    assert torch.equal(y1, y2)


def test_backward_uses_the_forward_mask():
    """dA = s (G B)ᵀ (X ⊙ Z): compare with an explicit-mask computation."""
    x, w, b, a, bb = _inputs(m=11, k=13, n=9, r=2, dtype=torch.float64)
    a.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 1.5, 0.4, True, seed=77, backend="torch")
    g = torch.randn_like(y)
    (da,) = torch.autograd.grad(y, [a], g)
    z = _rng.dropout_keep_mask(77, 0, 11, 13, 0.4).double() / 0.6
    torch.testing.assert_close(da, 1.5 * (g @ bb).t() @ (x * z))


# ---------------------------------------------------------------------------------------------- memory
def _saved_tensor_sizes(fn):
    sizes = []

    def pack(t):
        sizes.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_no_second_m_by_k_tensor_is_saved(p):
    m, k, n, r = 64, 48, 40, 4
    x, w, b, a, bb = _inputs(m=m, k=k, n=n, r=r, dtype=torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    saved = _saved_tensor_sizes(lambda: lora_linear(x, w, b, a, bb, 1.0, p, True, backend="torch"))
    big = {ptr for shape, ptr in saved if torch.Size(shape).numel() >= m * k}
    assert big == {x.untyped_storage().data_ptr()}, saved  # only x itself (W is N x K but a parameter: checked below)
    params = {t.untyped_storage().data_ptr() for t in (w, b, a, bb)}
    extra = [s for s, ptr in saved if ptr not in params and ptr != x.untyped_storage().data_ptr()]
    assert extra == [(m, r)], extra  # XA only


def test_peft_style_reference_saves_more():
    """Sanity for the memory test itself: the unfused composition with dropout saves a second M x K tensor."""
    m, k, n, r = 64, 48, 40, 4
    x, w, b, a, bb = _inputs(m=m, k=k, n=n, r=r, dtype=torch.float32)
    a.requires_grad_()

    def unfused():
        xd = F.dropout(x, 0.1, True)
        return F.linear(x, w, b) + F.linear(F.linear(xd, a), bb)

    saved = _saved_tensor_sizes(unfused)
    assert sum(torch.Size(s).numel() >= m * k for s, _ in saved) >= 1


# ---------------------------------------------------------------------------------------------- autocast
def test_autocast_cpu_bf16_runs_base_in_bf16_with_fp32_adapters():
    """Under bf16 autocast the result is bf16 and within 2x the error of PEFT's composition under the same
    autocast (which also runs the adapters in bf16), measured against the fp64 evaluation."""
    x, w, b, a, bb = _inputs(m=64, k=96, n=48, r=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 1.0, backend="torch")
        peft_like = lora_linear_reference(x, w, b, a, bb, 1.0)
    assert y.dtype == torch.bfloat16 and peft_like.dtype == torch.bfloat16
    ref64 = lora_linear_reference(*(t.double() for t in (x, w, b, a, bb)), 1.0)
    assert_close_to_oracle(y, ref64, peft_like, "y (autocast bf16)")
    # the adapters stay fp32 parameters (their gradients too); bf16 adapters are accepted under autocast
    a.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lora_linear(x, w, b, a, bb, 1.0, backend="torch").float().sum().backward()
        y16 = lora_linear(x, w.bfloat16(), b, a.detach().bfloat16(), bb.bfloat16(), 1.0, backend="torch")
    assert a.grad is not None and a.grad.dtype == torch.float32
    assert y16.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- selection
def test_backend_selection_env_global_and_errors(monkeypatch, caplog):
    x, w, b, a, bb = _inputs(dtype=torch.float32)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert lora_kernels.get_backend() == "torch"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        lora_kernels.get_backend()
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        lora_kernels.set_backend("fast")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        lora_linear(x, w, b, a, bb, 1.0, backend="cuda")  # no GPU here: the reason is in the message
    info = lora_kernels.backend_info()
    assert info["backends"]["torch"]["available"] and set(info["backends"]) == {"torch", "triton", "cuda"}
    with caplog.at_level(logging.INFO, logger="lora_kernels"):
        lora_kernels.set_backend("torch")
        lora_linear(x, w, b, a, bb, 1.0)
    assert lora_kernels.get_backend() == "torch"


def test_import_is_lean():
    import subprocess
    import sys

    code = (
        "import sys, lora_kernels, torch; "
        "assert 'triton' not in sys.modules, 'triton imported eagerly'; "
        "assert 'lora_kernels._C' not in sys.modules, 'native module loaded eagerly'; "
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
        "lora_kernels.backend_info(); assert 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- validation
BAD = [
    ("x", lambda x, w, b, a, bb: (x[..., :-1], w, b, a, bb), ValueError),
    ("lora_A", lambda x, w, b, a, bb: (x, w, b, a[:, :-1], bb), ValueError),
    ("lora_B", lambda x, w, b, a, bb: (x, w, b, a, bb[:-1]), ValueError),
    ("bias", lambda x, w, b, a, bb: (x, w, b[:-1], a, bb), ValueError),
    ("weight", lambda x, w, b, a, bb: (x, w.double(), b, a, bb), TypeError),
    ("lora_B", lambda x, w, b, a, bb: (x, w, b, a, bb.double()), TypeError),
    ("x", lambda x, w, b, a, bb: (x.long(), w, b, a, bb), TypeError),
    ("lora_A", lambda x, w, b, a, bb: (x, w, b, a[:0], bb[:, :0]), ValueError),
    ("weight", lambda x, w, b, a, bb: (x, w[0], b, a, bb), ValueError),
    ("lora_A", lambda x, w, b, a, bb: (x, w, b, a.to("meta"), bb.to("meta")), ValueError),
]


@pytest.mark.parametrize("name,mutate,exc", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, mutate, exc):
    args = mutate(*_inputs(dtype=torch.float32))
    with pytest.raises(exc, match=name):
        lora_linear(*args, 1.0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(*_inputs(dtype=torch.float32), 1.0, p)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), "2", None])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        lora_linear(*_inputs(dtype=torch.float32), scale)


def test_bad_seed_and_fp16_adapter_with_bf16_x():
    with pytest.raises(ValueError, match="seed"):
        lora_linear(*_inputs(dtype=torch.float32), 1.0, 0.1, True, seed=-1)
    x, w, b, a, bb = _inputs(dtype=torch.bfloat16, adapter_dtype=torch.float16)
    with pytest.raises(TypeError, match="lora_A"):
        lora_linear(x, w, b, a, bb, 1.0)


def test_torch_compile_traces_through_lora_linear_fullgraph():
    """The dispatch layer must not break graphs (no importlib calls, no locks while tracing)."""
    x, w, b, a, bb = _inputs(m=4, k=8, n=6, r=2, dtype=torch.float32)
    fn = torch.compile(lambda x: lora_linear(x, w, b, a, bb, 1.0, backend="torch"), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), lora_linear(x, w, b, a, bb, 1.0, backend="torch"))


def test_mask_int64_wrapping_multiply_matches_python_and_chunking_is_invisible(monkeypatch):
    """The in-place hash relies on int64 multiplication wrapping; check it on random 32-bit values against pure
    Python, and check that a tiny chunk size (many chunks, ragged last one) gives the same mask."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64)
    got = _rng._mix32_inplace(xs.clone(), torch.empty_like(xs)).tolist()
    assert got == [_rng.mix32_int(int(v)) for v in xs]
    ref = _rng.dropout_keep_mask(2**40 + 7, 2**32 - 50, 9, 23, 0.3)
    monkeypatch.setattr(_rng, "_CHUNK_ELEMS", 10)
    assert torch.equal(_rng.dropout_keep_mask(2**40 + 7, 2**32 - 50, 9, 23, 0.3), ref)


def test_auto_order_on_gpu_follows_the_measurements():
    """Without dropout at training sizes the torch path goes first on a GPU; with dropout or small M, triton."""
    from lora_kernels.backends import LoRAOpts
    from lora_kernels.backends import auto_order as _auto_order
    from lora_kernels.backends.heuristics import GPU_NO_DROPOUT_TORCH_MIN_M as AUTO_GPU_NO_DROPOUT_MIN_M

    class FakeX:
        def __init__(self, m):
            self.shape = (m, 64)

        def numel(self):
            return self.shape[0] * 64

    big, small = FakeX(AUTO_GPU_NO_DROPOUT_MIN_M), FakeX(16)
    assert _auto_order("cuda", (big, LoRAOpts(1.0)))[0] == "torch"
    assert _auto_order("cuda", (big, LoRAOpts(1.0, dropout_p=0.1)))[0] == "triton"
    assert _auto_order("cuda", (small, LoRAOpts(1.0)))[0] == "triton"
    assert _auto_order("cpu", (big, LoRAOpts(1.0))) == ("torch",)


def test_oracle_check_rule():
    """lora_kernels.testing (the GPU scripts' tolerance): 2x torch's own error + 1e-6 relative; a result off by
    more, or holding a NaN, fails; empty tensors pass."""
    from lora_kernels.testing import oracle_check

    ref = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch_out = ref.bfloat16().float()
    ok, err, tol = oracle_check(ref.float(), ref, torch_out)
    assert ok and err < tol
    bad = torch_out.clone()
    bad[3, 4] += 4 * tol
    assert not oracle_check(bad, ref, torch_out)[0]
    nan = ref.float().clone()
    nan[0, 0] = float("nan")
    assert not oracle_check(nan, ref, torch_out)[0]
    assert oracle_check(torch.empty(0), torch.empty(0, dtype=torch.float64), torch.empty(0))[0]
