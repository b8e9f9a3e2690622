"""The per-call-class caches of the dispatch layer (issue 15) change no answer: resolve() remembers only what the
built-in backends decided and forgets on every registry or configuration change; validate() still rejects every bad
call after a good one with the same tensor signature."""

from __future__ import annotations

import math

import pytest
import torch

import lora_kernels
from lora_kernels.backends import registry
from lora_kernels.backends.base import Backend, BackendUnavailableError, LoRAOpts
from lora_kernels.functional import lora_linear


def _args(p=0.0, m=5):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, 8, generator=g), torch.randn(6, 8, generator=g)
    a, b = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    return (x, w, None, a, b, None, LoRAOpts(1.0, dropout_p=p, seed=1))


def _counting_backend(name, calls):
    def supports(*args):
        calls.append(1)
        return True, "always"

    def apply(x, weight, bias, lora_A, lora_B, lora_R, opts):
        return lora_kernels.lora_linear_reference(x, weight, bias, lora_A, lora_B, opts.scale)

    return Backend(name, apply, lambda: (True, "here"), supports, {"cpu": -5})


def test_an_outside_backends_answer_is_asked_every_call_and_registration_forgets():
    args = _args()
    assert registry.resolve(args).name == "torch"  # remembered: built-ins only
    calls = []
    registry.register_backend(_counting_backend("counting", calls))
    try:
        assert registry.resolve(args).name == "counting"  # the registration forgot the torch answer
        registry.resolve(args)
        assert len(calls) == 2  # never remembered: its supports() may look at anything
    finally:
        registry.unregister_backend("counting")
    assert registry.resolve(args).name == "torch"


def test_set_backend_and_the_environment_are_part_of_the_call_class(monkeypatch):
    args = _args()
    assert registry.resolve(args).name == "torch"
    lora_kernels.set_backend("triton")
    assert registry.resolve(args).name == "triton"
    lora_kernels.set_backend(None)
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.resolve(args).name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton on CPU needs the interpreter
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        registry.resolve(args)


def test_shape_and_dropout_classes_are_told_apart():
    """auto's order depends on rows and dropout: a cached answer for one class never answers another."""
    seen = {}
    for p in (0.0, 0.1):
        for m in (1, 5, 4096):
            key = registry._call_class(_args(p, m), None)
            assert key not in seen
            seen[key] = registry.resolve(_args(p, m)).name


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: {**a, "scale": math.nan}, ValueError, "scale"),
        (lambda a: {**a, "dropout_p": 1.0}, ValueError, "dropout_p"),
        (lambda a: {**a, "lora_B": a["lora_B"][:, :1]}, ValueError, "lora_B"),
        (lambda a: {**a, "lora_A": a["lora_A"].double()}, TypeError, "lora_A"),
        (lambda a: {**a, "weight": [[1.0]]}, TypeError, "weight"),
    ],
)
def test_validation_after_a_good_call_still_rejects(mutate, exc, match):
    x, w, _, a, b, _, _ = _args()
    good = dict(x=x, weight=w, bias=None, lora_A=a, lora_B=b, scale=1.0, dropout_p=0.1)
    lora_linear(**good)
    lora_linear(**good)  # now served by the signature cache
    with pytest.raises(exc, match=match):
        lora_linear(**mutate(good))


def test_options_without_dropout_are_shared_and_with_dropout_fresh():
    x, w, _, a, b, _, _ = _args()
    seen = []

    def spy(*args):
        seen.append(args[-1])
        return lora_kernels.lora_linear_reference(*args[:5], args[-1].scale)

    registry.register_backend(Backend("spy", spy, lambda: (True, "here"), lambda *a: (True, "ok"), {}))
    try:
        for p in (0.0, 0.0, 0.2, 0.2):
            lora_linear(x, w, None, a, b, 1.5, p, backend="spy")
    finally:
        registry.unregister_backend("spy")
    assert seen[0] is seen[1] and seen[0] == LoRAOpts(1.5)
    assert seen[2] is not seen[3] and seen[2].seed != seen[3].seed and seen[2].dropout_p == 0.2
