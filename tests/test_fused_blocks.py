"""Fused CPU decoder-block ops (lora_kernels.models.fused_blocks, csrc/cpu/block_kernels.h): Llama's RMSNorm and
the MLP's SiLU(gate) * up against an fp64 oracle, within 2x of the eager transformers modules' own error in the same
dtype (forward and backward), and swapped into a model without changing its outputs, parameters or state_dict."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import assert_close_to_oracle

from lora_kernels.models import fused_blocks as fb

pytestmark = pytest.mark.skipif(fb.unavailable() is not None, reason=f"native block ops: {fb.unavailable()}")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _eager_norm(k, dtype, eps=1e-5, seed=0):
    norm = modeling_llama.LlamaRMSNorm(k, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(k, generator=torch.Generator().manual_seed(seed)))
    return norm.to(dtype)


def _run(fn, *inputs, dy):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*xs)
    y.backward(dy)
    return y.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 77), (1, 16), (40, 576)])
def test_rms_norm_matches_oracle_within_eager_error(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    norm = _eager_norm(shape[-1], dtype)
    w = norm.weight.detach()
    ref_y, (ref_dx, ref_dw) = _run(lambda a, b: b * (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5)),
                                   x.double(), w.double(), dy=dy.double())  # fmt: skip
    eager_y, (eager_dx, eager_dw) = _run(lambda a, b: modeling_llama.LlamaRMSNorm.forward(norm, a), x, w, dy=dy)
    y, (dx, dw) = _run(lambda a, b: fb.rms_norm(a, b, 1e-5), x, w, dy=dy)
    assert y.dtype == dx.dtype == dtype
    assert_close_to_oracle(y, ref_y, eager_y, "rms_norm y")
    assert_close_to_oracle(dx, ref_dx, eager_dx, "rms_norm dx")
    # the weight's gradient (full fine-tuning) goes through the eager module's parameter, not a copy: check vs oracle
    eager_norm = _eager_norm(shape[-1], dtype)
    out = eager_norm(x)
    out.backward(dy)
    assert_close_to_oracle(dw, ref_dw, eager_norm.weight.grad, "rms_norm dw")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_oracle_within_eager_error(dtype):
    g = torch.Generator().manual_seed(2)
    gate = (torch.randn(7, 3, 129, generator=g) * 4).to(dtype)
    gate.view(-1)[:6] = torch.tensor([0.0, -0.0, 60.0, -60.0, 95.0, -95.0]).to(dtype)  # exp's clamp and saturation
    up = torch.randn(7, 3, 129, generator=g).to(dtype)
    dy = torch.randn(7, 3, 129, generator=g).to(dtype)
    silu = torch.nn.functional.silu
    ref_y, ref_grads = _run(lambda a, b: silu(a) * b, gate.double(), up.double(), dy=dy.double())
    eager_y, eager_grads = _run(lambda a, b: silu(a) * b, gate, up, dy=dy)
    y, grads = _run(fb.silu_mul, gate, up, dy=dy)
    assert_close_to_oracle(y, ref_y, eager_y, "silu_mul y")
    for name, got, ref, eager in zip(("d_gate", "d_up"), grads, ref_grads, eager_grads):
        assert got.dtype == dtype
        assert_close_to_oracle(got, ref, eager, f"silu_mul {name}")


def test_fuse_blocks_same_model_outputs_and_state():
    from lora_kernels.models.tiny import tiny_random

    torch.manual_seed(0)
    model, _ = tiny_random(seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    keys = list(model.state_dict())
    ref = model(input_ids=ids).logits
    ref.float().square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    counts = fb.fuse_blocks(model)
    n_layers = model.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * n_layers + 1, "mlp": n_layers}
    assert isinstance(model.model.norm, modeling_llama.LlamaRMSNorm) and list(model.state_dict()) == keys
    out = model(input_ids=ids).logits
    out.float().square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():  # every weight trains here (full FT): the norm weights' grads included
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert fb.fuse_blocks(model) == counts  # idempotent
    fb.unfuse_blocks(model)
    assert (
        type(model.model.norm) is modeling_llama.LlamaRMSNorm and type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    )


def test_off_path_call_runs_eager_and_says_why(caplog):
    norm = _eager_norm(9, torch.float64)
    x = torch.randn(4, 9, dtype=torch.float64)
    ref = modeling_llama.LlamaRMSNorm.forward(norm, x)
    fb._warned.clear()
    fb.fuse_blocks(norm)
    with caplog.at_level(logging.WARNING, logger="lora_kernels"):
        out = norm(x)
    assert torch.equal(out, ref)
    assert "LlamaRMSNorm runs its eager forward" in caplog.text and "torch.float64" in caplog.text


def test_bad_arguments_are_named():
    lib = fb._lib()
    with pytest.raises(ValueError, match="rms_norm_forward: dtype must be float32, float16 or bfloat16"):
        lib.rms_norm_forward(0, 0, 0, 0, 0, 4, 1e-5, 3, 1)
    with pytest.raises(ValueError, match="silu_mul_forward: nthreads must be >= 1"):
        lib.silu_mul_forward(0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        fb.silu_mul(torch.zeros(2, 3), torch.zeros(3, 2))
