"""Chunked linear cross-entropy against F.cross_entropy on full logits.

Tolerance rule (tests/helpers.py, the FlashAttention rule): the fp64 unchunked composition is the oracle; the
chunked op in fp32 must be within 2x of torch's own fp32 error (F.cross_entropy on full fp32 logits) plus a
atol of a few fp32 ulps of the value (``_ulps``), for the loss and for every gradient. Chunking only changes the summation order of fp32 sums (the
loss over chunks, dW over chunks), which is the same order of error as torch's own reductions.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_oracle

from lora_kernels.training.losses import (
    auto_chunk_size,
    causal_lm_loss,
    chunked_linear_cross_entropy,
    reference_linear_cross_entropy,
)

IGN = -100


def _problem(t, h, v, dtype=torch.float32, bias=True, ignore_every=3, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(t, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, v, (t,), generator=g)
    if ignore_every:
        y[::ignore_every] = IGN
    if lead is not None:
        hid, y = hid.view(*lead, h), y.view(*lead)
    return hid, w, b, y


def _loss_and_grads(fn, hid, w, b, y, dtype, need=(True, True, True), scale=1.7, **kw):
    hid = hid.to(dtype).requires_grad_(need[0])
    w = w.to(dtype).requires_grad_(need[1])
    b = b.to(dtype).requires_grad_(need[2]) if b is not None else None
    loss = fn(hid, w, y, b, **kw)
    ins = [t for t in (hid, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss * scale, ins) if ins else ()  # grad_output != 1 exercises the scaling
    return loss.detach(), grads


def _ulps(ref64: torch.Tensor, n: int = 4) -> float:
    """A few fp32 ulps of the reference's magnitude: a fp32 result cannot be closer than its own rounding, and
    torch's error can be 0 by luck (the atol of the oracle rule)."""
    return n * torch.finfo(torch.float32).eps * max(ref64.abs().max().item(), 1e-30)


def _check(hid, w, b, y, need=(True, True, True), reduction="mean", **kw):
    ref = lambda *a, **k: reference_linear_cross_entropy(*a, reduction=reduction, **k)  # noqa: E731
    chk = lambda *a, **k: chunked_linear_cross_entropy(*a, reduction=reduction, **kw)  # noqa: E731
    l64, g64 = _loss_and_grads(ref, hid, w, b, y, torch.float64, need)
    l32, g32 = _loss_and_grads(ref, hid, w, b, y, torch.float32, need)
    lc, gc = _loss_and_grads(chk, hid, w, b, y, torch.float32, need)
    assert lc.dtype == torch.float32
    assert_close_to_oracle(lc, l64, l32, "loss", atol=_ulps(l64))
    assert len(gc) == len(g64)
    for i, (a, r, t) in enumerate(zip(gc, g64, g32)):
        assert a.dtype == torch.float32
        assert_close_to_oracle(a, r, t, f"grad[{i}]", atol=_ulps(r))


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
@pytest.mark.parametrize(
    "t,h,v,chunk",
    [(37, 16, 101, 8), (64, 24, 257, 64), (50, 9, 33, 1), (23, 12, 50, 1000)],
    ids=["chunk8-of-37", "chunk-divides", "chunk1", "chunk>T"],
)
def test_matches_full_cross_entropy(t, h, v, chunk, grad_mode):
    hid, w, b, y = _problem(t, h, v)
    _check(hid, w, b, y, chunk_size=chunk, grad_mode=grad_mode)


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_sum_reduction_3d_no_bias(grad_mode):
    hid, w, b, y = _problem(3 * 13, 20, 77, bias=False, lead=(3, 13))
    _check(hid, w, b, y, reduction="sum", chunk_size=10, grad_mode=grad_mode)


@pytest.mark.parametrize(
    "need", [(True, False, False), (False, True, False), (False, False, True)], ids=["dh", "dW", "db"]
)
def test_only_requested_gradients(need):
    hid, w, b, y = _problem(29, 8, 40)
    _check(hid, w, b, y, need=need, chunk_size=7)


def test_frozen_head_gets_no_grad_and_no_work():
    hid, w, b, y = _problem(20, 8, 30)
    hid = hid.float().requires_grad_()
    w = w.float()
    loss = chunked_linear_cross_entropy(hid, w, y, chunk_size=6)
    loss.backward()
    assert w.grad is None and hid.grad is not None


def test_num_items_in_batch_matches_sum_over_count():
    hid, w, b, y = _problem(31, 8, 40)
    hid, w, b = hid.float(), w.float(), b.float()
    total = chunked_linear_cross_entropy(hid, w, y, b, reduction="sum", chunk_size=5)
    # the divisor of a larger (global) batch: 100 tokens of which these 31 rows are part
    part = chunked_linear_cross_entropy(hid, w, y, b, num_items_in_batch=100, chunk_size=5)
    torch.testing.assert_close(part, total / 100)


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_all_ignored_gives_zero_loss_and_grads_no_nan(grad_mode):
    hid, w, b, y = _problem(17, 8, 30)
    y[:] = IGN
    h32 = hid.float().requires_grad_()
    w32 = w.float().requires_grad_()
    loss = chunked_linear_cross_entropy(h32, w32, y, b.float(), chunk_size=4, grad_mode=grad_mode)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isnan(F.cross_entropy(hid @ w.t(), y, ignore_index=IGN))  # what the unchunked op does
    assert h32.grad.abs().max().item() == 0.0 and w32.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_ignored_rows_never_reach_the_head(grad_mode):
    """Only labelled rows are projected: non-finite hidden states on ignored rows change nothing, their dh is 0."""
    hid, w, b, y = _problem(23, 8, 30, ignore_every=3)
    ref_h = hid.clone().requires_grad_()
    ref = chunked_linear_cross_entropy(ref_h, w, y, b, chunk_size=4, grad_mode=grad_mode)
    ref.backward()
    poisoned = hid.clone()
    poisoned[y == IGN] = float("nan")  # a head GEMM over these rows would make the loss NaN
    ph = poisoned.requires_grad_()
    loss = chunked_linear_cross_entropy(ph, w, y, b, chunk_size=4, grad_mode=grad_mode)
    loss.backward()
    assert torch.equal(loss, ref) and torch.equal(ph.grad, ref_h.grad)
    assert ph.grad[y == IGN].abs().max().item() == 0.0 and ph.grad[y != IGN].abs().max().item() > 0


def test_empty_input():
    h = torch.zeros(0, 8, requires_grad=True)
    loss = chunked_linear_cross_entropy(h, torch.randn(10, 8), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0


def test_no_grad_path_returns_loss_only():
    hid, w, b, y = _problem(25, 8, 40)
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hid.float().requires_grad_(), w.float(), y, chunk_size=7)
    with_grad = chunked_linear_cross_entropy(hid.float().requires_grad_(), w.float(), y, chunk_size=7)
    assert loss.grad_fn is None and with_grad.grad_fn is not None
    assert torch.equal(loss, with_grad.detach())  # the same chunk loop, minus the gradient work


def test_bf16_matches_hf_style_upcast():
    """bf16 activations: same recipe as HF (bf16 GEMM, fp32 softmax); compared to the fp64 oracle, the chunked
    error must stay within 2x the unchunked bf16 error (chunking only regroups the fp32 sums)."""
    hid, w, b, y = _problem(40, 32, 64, bias=False)
    ref = reference_linear_cross_entropy
    l64, g64 = _loss_and_grads(ref, hid, w, None, y, torch.float64, (True, False, False))
    lbf, gbf = _loss_and_grads(ref, hid, w, None, y, torch.bfloat16, (True, False, False))
    lc, gc = _loss_and_grads(
        chunked_linear_cross_entropy, hid, w, None, y, torch.bfloat16, (True, False, False), chunk_size=9
    )
    assert lc.dtype == torch.float32 and gc[0].dtype == torch.bfloat16
    assert_close_to_oracle(lc, l64, lbf, "loss", atol=1e-6)
    assert_close_to_oracle(gc[0], g64[0], gbf[0], "dh", atol=1e-6)


def test_gradcheck_fp64():
    hid, w, b, y = _problem(11, 5, 13)
    args = (hid.requires_grad_(), w.requires_grad_(), y, b.requires_grad_())
    fn = lambda h_, w_, y_, b_: chunked_linear_cross_entropy(h_, w_, y_, b_, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_auto_chunk_size():
    # logits chunk about the size of h: T / ceil(V / H), power of two, floor 256 rows
    assert auto_chunk_size(2048, 576, 49152) == 256
    assert auto_chunk_size(65536, 2048, 32000) == 4096
    assert auto_chunk_size(10, 8, 100) == 256


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"labels": torch.full((6,), 99)}, ValueError, "labels must be in"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, ValueError, "labels shape"),
        ({"labels": torch.zeros(6)}, TypeError, "labels must be an integer"),
        ({"weight": torch.randn(10, 7)}, ValueError, "weight.shape"),
        ({"weight": torch.randn(10, 8, dtype=torch.float64)}, TypeError, "weight dtype"),
        ({"bias": torch.randn(9)}, ValueError, "bias"),
        ({"reduction": "none"}, ValueError, "reduction"),
        ({"grad_mode": "later"}, ValueError, "grad_mode"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"reduction": "sum", "num_items_in_batch": 3}, ValueError, "num_items_in_batch"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_names_argument(kwargs, exc, match):
    args = {"hidden": torch.randn(6, 8), "weight": torch.randn(10, 8), "labels": torch.zeros(6, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        chunked_linear_cross_entropy(**args)


def _tiny_llama(vocab=96, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "separate-head"])
def test_causal_lm_loss_equals_hf_loss(tie):
    model = _tiny_llama(tie=tie)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGN
    labels[2, 7:] = IGN
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    params = list(model.parameters())
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, params)
    loss = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=5)
    grads = torch.autograd.grad(loss, params)
    model64 = copy.deepcopy(model).double()
    ref64 = model64(input_ids=ids, attention_mask=mask, labels=labels).loss
    grads64 = torch.autograd.grad(ref64, list(model64.parameters()))
    assert_close_to_oracle(loss, ref64, ref, "loss", atol=1e-6)
    for i, (a, r64, r32) in enumerate(zip(grads, grads64, ref_grads)):
        assert_close_to_oracle(a, r64, r32, f"grad[{i}]", atol=1e-7)


def test_enable_chunked_loss_routes_model_call():
    from lora_kernels.training.losses import disable_chunked_loss, enable_chunked_loss

    model = _tiny_llama()
    name = type(model).__name__
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :3] = IGN
    ref = model(input_ids=ids, labels=labels, num_items_in_batch=11).loss
    logits = model(input_ids=ids).logits
    enable_chunked_loss(model, chunk_size=7)
    assert type(model).__name__ == name and isinstance(model, type(model).__mro__[1])
    out = model(input_ids=ids, labels=labels, num_items_in_batch=11)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    assert torch.equal(model(input_ids=ids).logits, logits)  # no labels: the original forward
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGN)[:, 1:]
    total = model(input_ids=ids, shift_labels=shifted, num_items_in_batch=1).loss  # the sum over targets
    torch.testing.assert_close(total / 11, ref, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    disable_chunked_loss(model)
    assert model(input_ids=ids, labels=labels).logits is not None
    with pytest.raises(ValueError, match="chunk_size"):
        enable_chunked_loss(model, chunk_size=-1)
