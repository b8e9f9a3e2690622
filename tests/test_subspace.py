"""The subspace method (``lora_kernels.nn.subspace``): frozen top-r singular vectors, trainable ``r x r`` ``R``.

Checks: R = 0 reproduces the base layer bit for bit; the frame really is the top-r SVD; gradients of the fused op
with ``lora_R`` by fp64 gradcheck (torch path; Triton path under the interpreter when the backend supports it);
only ``R`` (and the head) train; merge equals the unmerged output; save/load round trips (with and without the
stored bases) and refuses a different base model.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_TRITON, assert_close_to_oracle
from torch import nn

from lora_kernels import lora_linear, lora_linear_reference
from lora_kernels.adapters.subspace import (
    CONFIG_NAME,
    apply_subspace,
    load_subspace,
    merge_subspace,
    read_subspace_config,
    save_subspace,
    subspace_modules,
)
from lora_kernels.nn.subspace import SubspaceLinear

# Odd sizes on purpose (not multiples of any block), rank not a power of two.
SHAPES = [((5, 7), 6, 3), ((2, 3, 13), 11, 5), ((1, 1, 9), 17, 4)]


def _mlp(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 21), nn.GELU(), nn.Linear(21, 10), nn.GELU(), nn.Linear(10, 3)).to(dtype)


def _randomise_R(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in subspace_modules(model).values():
            m.lora_R.copy_(torch.randn(m.lora_R.shape, generator=g, dtype=torch.float64).to(m.lora_R.dtype))


@pytest.mark.parametrize("x_shape,n,r", SHAPES, ids=lambda v: str(v))
def test_zero_R_is_exactly_the_base_layer(x_shape, n, r):
    torch.manual_seed(0)
    lin = nn.Linear(x_shape[-1], n)
    x = torch.randn(x_shape)
    want = F.linear(x, lin.weight, lin.bias)
    layer = SubspaceLinear.from_linear(lin, r=r)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # shared, not copied
    assert torch.equal(layer.lora_R, torch.zeros(r, r))
    assert torch.equal(layer(x), want)
    # and it is not trivially so: a non-zero R changes the output
    with torch.no_grad():
        layer.lora_R.fill_(0.5)
    assert not torch.allclose(layer(x), want)


def test_non_contiguous_input():
    torch.manual_seed(0)
    lin = nn.Linear(9, 6)
    x = torch.randn(9, 5).t()  # [5, 9], non-contiguous
    layer = SubspaceLinear.from_linear(lin, r=4)
    assert torch.equal(layer(x), F.linear(x, lin.weight, lin.bias))


def test_frame_is_the_top_r_svd():
    torch.manual_seed(0)
    lin = nn.Linear(15, 11).double()
    layer = SubspaceLinear.from_linear(lin, r=5)
    a, b = layer.lora_A.weight, layer.lora_B.weight  # V_rᵀ [r, in], U_r [out, r]
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(a @ a.t(), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(b.t() @ b, eye, atol=1e-12, rtol=0)
    s = torch.linalg.svdvals(lin.weight.detach())
    # U_rᵀ W V_r = diag(S_r) with S_r the largest singular values, in order
    torch.testing.assert_close(b.t() @ lin.weight.detach() @ a.t(), torch.diag(s[:5]), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.svd_sigma.double(), s[:5], atol=1e-6 * s[0].item(), rtol=0)
    # canonical signs: the largest-|.| entry of each U_r column is positive
    idx = b.abs().argmax(0)
    assert (b.gather(0, idx[None]) > 0).all()


def _grad_inputs(x_shape, n, r, requires_weight_grad):
    g = torch.Generator().manual_seed(0)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, generator=g, dtype=torch.float64, requires_grad=requires_weight_grad)
    b = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=requires_weight_grad)
    u, _, vh = torch.linalg.svd(w.detach())
    a = vh[:r].clone().requires_grad_(requires_weight_grad)
    bb = u[:, :r].clone().requires_grad_(requires_weight_grad)
    rr = torch.randn(r, r, generator=g, dtype=torch.float64, requires_grad=True)
    return x, w, b, a, bb, rr


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("all_grads", [False, True], ids=["R-only", "all"])
@pytest.mark.parametrize("x_shape,n,r", SHAPES, ids=lambda v: str(v))
def test_gradcheck_torch_path(x_shape, n, r, all_grads, dropout_p):
    """fp64 finite differences vs the torch backend's analytic backward, with the r x r middle matrix."""
    x, w, b, a, bb, rr = _grad_inputs(x_shape, n, r, all_grads)
    s = 1.7

    def f(x, w, b, a, bb, rr):
        return lora_linear(x, w, b, a, bb, s, dropout_p, True, lora_R=rr, seed=1234, backend="torch")

    assert torch.autograd.gradcheck(f, (x, w, b, a, bb, rr), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("x_shape,n,r", SHAPES, ids=lambda v: str(v))
def test_torch_path_matches_unfused_reference(x_shape, n, r):
    x, w, b, a, bb, rr = _grad_inputs(x_shape, n, r, False)
    y = lora_linear(x, w, b, a, bb, 0.9, 0.25, True, lora_R=rr, seed=7, backend="torch")
    ref = lora_linear_reference(x, w, b, a, bb, 0.9, 0.25, True, lora_R=rr, seed=7)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("x_shape,n,r", SHAPES, ids=lambda v: str(v))
def test_triton_path_with_R(x_shape, n, r):
    """Forward and gradients of the Triton path (interpreter on CPU) within 2x torch's fp32 error of fp64."""
    from lora_kernels.backends import get

    x64, w64, b64, a64, bb64, rr64 = _grad_inputs(x_shape, n, r, True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    leaves32 = [t.detach().float().to(device).requires_grad_(True) for t in (x64, w64, b64, a64, bb64, rr64)]
    from lora_kernels.backends import LoRAOpts

    ok, why = get("triton").availability()
    if ok:
        ok, why = get("triton").supports(*leaves32, LoRAOpts(scale=1.3))
    if not ok:
        pytest.skip(f"triton backend: {why}")

    def run(backend, leaves):
        y = lora_linear(*leaves[:5], 1.3, lora_R=leaves[5], backend=backend)
        gy = torch.ones_like(y) / y.numel() ** 0.5
        grads = torch.autograd.grad(y, leaves, gy)
        return [y, *grads]

    out = run("triton", leaves32)
    base = run("torch", [t.detach().clone().requires_grad_(True) for t in leaves32])
    ref = run("torch", [t.detach().clone().requires_grad_(True) for t in (x64, w64, b64, a64, bb64, rr64)])
    for name, o, t, r64 in zip(["y", "dx", "dw", "db", "dA", "dB", "dR"], out, base, ref):
        assert_close_to_oracle(o.cpu(), r64, t.cpu(), name)


def test_only_R_and_saved_modules_train():
    model = _mlp()
    rep = apply_subspace(model, target_modules=["0", "2"], r=4, modules_to_save=["4"])
    assert rep.replaced == ["0", "2"] and rep.modules_to_save == ["4"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_R", "2.lora_R", "4.weight", "4.bias"}
    assert rep.trainable_params == 2 * 16 + 3 * 10 + 3
    _randomise_R(model)
    model(torch.randn(6, 13)).square().sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert model[0].lora_R.grad.abs().sum() > 0


def test_training_moves_only_R():
    model = _mlp()
    apply_subspace(model, target_modules=["0", "2"], r=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 13)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"0.lora_R", "2.lora_R"}


def test_merge_equals_unmerged_fp64():
    model = _mlp(torch.float64)
    apply_subspace(model, r=3)
    _randomise_R(model)
    x = torch.randn(4, 7, 13, dtype=torch.float64)
    y = model(x)
    # per-layer merge()/unmerge() round trip
    layer = model[0]
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(model(x), y, atol=1e-12, rtol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, atol=1e-14, rtol=0)
    merge_subspace(model)
    assert not subspace_modules(model) and not hasattr(model, "subspace_config")
    assert all(type(m) is nn.Linear for m in model if isinstance(m, nn.Linear))
    torch.testing.assert_close(model(x), y, atol=1e-12, rtol=1e-12)


def test_merge_fp32_within_rounding_of_fp64():
    """fp32 merge: error vs the fp64 merged model within 2x the unmerged fp32 model's own error (+ small atol)."""
    model32 = _mlp(torch.float32)
    apply_subspace(model32, r=3)
    _randomise_R(model32)
    model64 = _mlp(torch.float64)
    apply_subspace(model64, r=3)
    with torch.no_grad():  # same frames and R as the fp32 model, in fp64
        for (_, m32), (_, m64) in zip(subspace_modules(model32).items(), subspace_modules(model64).items()):
            for src, dst in ((m32.lora_A.weight, m64.lora_A.weight), (m32.lora_B.weight, m64.lora_B.weight)):
                dst.copy_(src.double())
            m64.lora_R.copy_(m32.lora_R.double())
    x = torch.randn(64, 13)
    ref = model64(x.double())
    unmerged = model32(x)
    merge_subspace(model32)
    assert_close_to_oracle(model32(x), ref, unmerged, "merged fp32", factor=2.0, atol=1e-6)


@pytest.mark.parametrize("include_bases", [True, False], ids=["with-bases", "compact"])
def test_save_load_round_trip(tmp_path, include_bases):
    model = _mlp()
    apply_subspace(model, target_modules=r"[02]", r=4, modules_to_save=["4"])
    _randomise_R(model)
    with torch.no_grad():
        model[4].weight.add_(1.0)  # the saved head must come back too
    x = torch.randn(5, 13)
    y = model(x)
    save_subspace(model, tmp_path, include_bases=include_bases, base_model_name_or_path="mlp")
    cfg, raw = read_subspace_config(tmp_path)
    assert raw["bases_included"] is include_bases and cfg.target_modules == ["0", "2"] and cfg.r == 4
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "subspace_model.safetensors")))
    assert ("0.lora_A.weight" in keys) is include_bases and "0.lora_R" in keys and "4.weight" in keys

    fresh = _mlp()  # same base weights (same seed), adapter-free
    load_subspace(fresh, tmp_path)
    assert sorted(subspace_modules(fresh)) == ["0", "2"]
    assert torch.equal(fresh(x), y)
    # loading into a model that already has the layers replaces R
    again = _mlp()
    apply_subspace(again, target_modules=["0", "2"], r=4, modules_to_save=["4"])
    load_subspace(again, tmp_path)
    assert torch.equal(again(x), y)


def test_compact_file_refuses_a_different_base(tmp_path):
    model = _mlp(seed=0)
    apply_subspace(model, target_modules=["0"], r=4)
    save_subspace(model, tmp_path, include_bases=False)
    with pytest.raises(ValueError, match=r"module '0'.*singular values"):
        load_subspace(_mlp(seed=5), tmp_path)


def test_load_errors_name_the_problem(tmp_path):
    model = _mlp()
    apply_subspace(model, target_modules=["0", "2"], r=4)
    save_subspace(model, tmp_path)
    other = _mlp()
    apply_subspace(other, target_modules=["0"], r=4)
    with pytest.raises(ValueError, match="not in the adapter|not subspace layers"):
        load_subspace(other, tmp_path)
    other = _mlp()
    apply_subspace(other, target_modules=["0", "2"], r=3)
    with pytest.raises(ValueError, match="'r'"):
        load_subspace(other, tmp_path)
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    raw["format"] = "something-else"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'format'"):
        load_subspace(_mlp(), tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_subspace(_mlp(), tmp_path / "nope")


def test_bad_arguments():
    with pytest.raises(ValueError, match="r must be <="):
        apply_subspace(_mlp(), target_modules=["4"], r=5)
    with pytest.raises(ValueError, match="r must be a positive int"):
        apply_subspace(_mlp(), r=0)
    with pytest.raises(ValueError, match="matched no module"):
        apply_subspace(_mlp(), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="init_lora_weights"):
        SubspaceLinear.from_linear(nn.Linear(4, 4), r=2, init_lora_weights="kaiming")
    model = _mlp()
    apply_subspace(model, r=2)
    with pytest.raises(ValueError, match="already has"):
        apply_subspace(model, r=2)
    with pytest.raises(ValueError, match="no subspace modules"):
        save_subspace(_mlp(), "/tmp/never-written")


def test_subspace_on_tiny_bert_all_linear():
    """On a HF classifier: all-linear targets every encoder linear, the head is saved; counts are r^2 per layer."""
    from lora_kernels.models import tiny_bert

    torch.manual_seed(0)
    model = tiny_bert(3, layers=2)
    total = sum(p.numel() for p in model.parameters())
    rep = apply_subspace(model, r=4, exclude_modules=["classifier"], modules_to_save=["classifier"])
    n_linear = 2 * 6 + 1  # q, k, v, attn-out, intermediate, output per layer + pooler
    assert len(rep.replaced) == n_linear
    head = sum(p.numel() for p in model.classifier.parameters())
    assert rep.trainable_params == n_linear * 16 + head
    assert rep.total_params == total + sum(
        m.lora_A.weight.numel() + m.lora_B.weight.numel() + 16 for m in subspace_modules(model).values()
    )
    ids = torch.randint(0, 64, (2, 9))
    model.eval()
    assert model(input_ids=ids).logits.shape == (2, 3)


def test_env_has_interpreter_on_cpu():
    # The Triton test above relies on conftest setting the interpreter when there is no GPU.
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
