"""The open backend registry and the shared op contract (issue 16): a backend from outside the package is one
``Kernels`` object + ``define_lora_op`` + ``register_backend`` (or an entry point), and it gets schema, fake,
autograd, ``torch.compile`` and ``auto`` selection for free."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import assert_close_to_oracle

import lora_kernels
from lora_kernels.backends import (
    Backend,
    BackendUnavailableError,
    LoRAOpts,
    auto_order,
    names,
    register_backend,
    registry,
    unregister_backend,
)
from lora_kernels.backends.heuristics import auto_order as pure_auto_order
from lora_kernels.backends.opdef import define_lora_op, grad_layout


class _EinsumKernels:
    """A toy backend: the LoRA math in einsums (no dropout), to exercise the contract."""

    calls = 0

    def resolve_plan(self, plan, m, dropout_p):
        if plan not in ("auto", "einsum"):
            raise ValueError(f"plan must be 'einsum', got {plan!r}")
        return "einsum"

    def forward(self, x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset, plan):
        type(self).calls += 1
        x2 = x.reshape(-1, x.shape[-1])
        xa = torch.einsum("mk,rk->mr", x2.double(), lora_A.double()).float()
        y = x2 @ weight.t() + scale * (xa.to(x.dtype) @ lora_B.t().to(x.dtype))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0]), xa

    def backward(self, g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset, need_dx, need_da,
                 need_db, need_dbias, need_dr, deterministic, plan):  # fmt: skip
        k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
        g2, x2 = g.reshape(-1, n).float(), x.reshape(-1, k).float()
        gb = g2 @ lora_B.float()
        dx = (g2 @ weight.float() + scale * gb @ lora_A.float()).to(x.dtype).view(x.shape)
        parts = {"da": scale * gb.t() @ x2, "db": scale * g2.t() @ xa, "dbias": g2.sum(0)}
        off_da, off_db, off_dbias, _, length = grad_layout(r, k, n, need_da, need_db, need_dbias, False)
        flat = torch.zeros(length)
        for off, key in ((off_da, "da"), (off_db, "db"), (off_dbias, "dbias")):
            if off >= 0:
                flat[off : off + parts[key].numel()] = parts[key].reshape(-1)
        return (dx if need_dx else x.new_empty(0)), flat


_OP = define_lora_op("test_einsum", _EinsumKernels())


def _backend(name="einsum", prio=None):
    return Backend(
        name,
        apply_fn=lambda *args: _OP.apply(*args),
        availability_fn=lambda: (True, "always"),
        supports_fn=lambda x, w, b, A, B, R, opts: (
            (False, "no dropout or lora_R in the toy") if opts.dropout_p > 0 or R is not None else (True, "ok")
        ),
        auto_priority=prio or {},
    )


@pytest.fixture
def einsum_backend():
    register_backend(_backend(prio={"cpu": -1}))
    yield
    unregister_backend("einsum")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 12, generator=g, requires_grad=True)
    w, b = torch.randn(7, 12, generator=g), torch.randn(7, generator=g, requires_grad=True)
    a = torch.randn(3, 12, generator=g, requires_grad=True)
    bb = torch.randn(7, 3, generator=g, requires_grad=True)
    return x, w, b, a, bb


def _grads(backend, dtype=torch.float32):
    x, w, b, a, bb = (t.detach().to(dtype).requires_grad_(t.requires_grad) for t in _inputs())
    y = lora_kernels.lora_linear(x, w, b, a, bb, 2.0, backend=backend)
    y.square().sum().backward()
    return [y, x.grad, b.grad, a.grad, bb.grad]


def test_an_outside_backend_runs_through_the_contract(einsum_backend):
    assert "einsum" in names()
    ours, ref64, torch32 = _grads("einsum"), _grads("torch", torch.float64), _grads("torch")
    for name, o, r, t in zip(("y", "dx", "db", "dA", "dB"), ours, ref64, torch32):
        assert_close_to_oracle(o, r, t, name, atol=1e-5 * r.abs().max().item())


def test_auto_follows_the_registered_priority_and_says_what_it_skipped(einsum_backend, caplog):
    x, w, b, a, bb = _inputs()
    assert auto_order("cpu", (x, LoRAOpts(2.0)))[:2] == ("einsum", "torch")
    before = _EinsumKernels.calls
    lora_kernels.lora_linear(x, w, b, a, bb, 2.0)
    assert _EinsumKernels.calls == before + 1
    with caplog.at_level(logging.WARNING, logger="lora_kernels"):
        lora_kernels.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.1, seed=3)  # the toy refuses dropout
    assert any(
        "auto skipped faster backend 'einsum'" in r.message and "no dropout" in r.message for r in caplog.records
    )


def test_opcheck_and_compile_of_an_outside_op():
    x, w, b, a, bb = _inputs()
    torch.library.opcheck(_OP.fwd, (x, w, b, a, bb, None, 2.0, 0.0, 0, 0, False, "einsum"))

    def f(x, w, b, a, bb):
        return _OP.apply(x, w, b, a, bb, None, LoRAOpts(2.0)).sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(x, w, b, a, bb)
    ref = lora_kernels.lora_linear_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)
    assert_close_to_oracle(out, ref.sum(), f(x, w, b, a, bb), "compiled sum", atol=1e-4)


def test_registration_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_backend(_backend("torch"))
    with pytest.raises(ValueError, match="not 'auto'"):
        register_backend(_backend("auto"))
    with pytest.raises(ValueError, match="lower-case"):
        register_backend(_backend("Bad Name"))
    with pytest.raises(TypeError, match="Backend"):
        register_backend(object())
    with pytest.raises(ValueError, match="built-in"):
        unregister_backend("torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_kernels.set_backend("einsum")  # not registered (the fixture is not used here)
    with pytest.raises(BackendUnavailableError, match="not registered"):
        registry.get("nope")


def test_entry_points_load_and_a_broken_one_is_named(monkeypatch, caplog):
    class EP:
        def __init__(self, name, obj):
            self.name, self.value, self._obj = name, f"pkg:{name}", obj

        def load(self):
            if isinstance(self._obj, Exception):
                raise self._obj
            return self._obj

    eps = [EP("ep_ok", lambda: _backend("ep-ok")), EP("ep_bad", ImportError("no module named pkg"))]
    monkeypatch.setattr(
        "importlib.metadata.entry_points", lambda group: eps if group == registry.ENTRY_POINT_GROUP else []
    )
    with caplog.at_level(logging.WARNING, logger="lora_kernels"):
        registry._load_entry_points()
    try:
        assert "ep-ok" in names()
        assert any("'ep_bad'" in r.message and "no module named pkg" in r.message for r in caplog.records)
    finally:
        unregister_backend("ep-ok")


def test_pure_auto_order():
    prio = {"torch": {"cpu": 0, "cuda": 10}, "triton": {"cuda": 0}, "cuda": {"cuda": 20}, "mine": {"cuda": 5}}
    assert pure_auto_order("cuda", 16, 0.0, prio) == ("triton", "mine", "torch", "cuda")
    assert pure_auto_order("cuda", 4096, 0.0, prio)[0] == "torch"  # no dropout at training sizes: cuBLAS path first
    assert pure_auto_order("cuda", 4096, 0.1, prio)[0] == "triton"
    assert pure_auto_order("cpu", 4096, 0.1, prio) == ("torch",)
    assert pure_auto_order("mps", 16, 0.0, prio) == ()
