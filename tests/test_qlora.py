"""QLoRA (issue 17): bitsandbytes 4-bit bases (NF4/FP4, double quantization, every blocksize) under the op, the
torch path (the oracle), the layer, injection and adapters against PEFT's QLoRA, merge, quantize-at-load, SFT.

The Triton kernels' 4-bit path is in tests/test_qlora_triton.py."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from helpers import assert_close_to_oracle, rel_err

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'lora_kernels[qlora]')")
import bitsandbytes.functional as bnbF  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import LoRALinear  # noqa: E402
from lora_kernels.backends import BackendUnavailableError, LoRAOpts  # noqa: E402
from lora_kernels.functional import lora_linear, lora_linear_reference  # noqa: E402
from lora_kernels.quant import convert, nf4  # noqa: E402


def params4bit(n, k, blocksize=64, quant_type="nf4", nested=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    return bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                             quant_type=quant_type)._quantize("cpu")  # fmt: skip


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern, with -0 read as +0: bitsandbytes' CPU kernel writes FP4's code 8 as -0.0, its own torch
    fallback (and ours, from the quant state's table) as +0.0."""
    t = t + 0.0
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


# ------------------------------------------------------------------------------------------ format, dequantization
CASES = [  # (N, K): blocks spanning rows (K % blocksize != 0), odd K (one byte holds two rows' codes), tiny
    (7, 33), (64, 100), (5, 1), (45, 257), (3, 4101),
]  # fmt: skip


@pytest.mark.parametrize("n,k", CASES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_dequantize_bit_identical_to_bitsandbytes(n, k, blocksize, quant_type, nested):
    for wdt in (torch.float32, torch.bfloat16):
        p = params4bit(n, k, blocksize, quant_type, nested, wdt)
        q = nf4.describe(p)
        assert torch.equal(bits(nf4.dequantize(q)), bits(bnbF.dequantize_4bit(p.data, p.quant_state)))
        am = nf4.absmax_fp32(q)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            ref = torch.ops.bitsandbytes.dequantize_4bit.default(p.data, am, blocksize, quant_type, (n, k), dt)
            full = nf4.dequantize_rows(q, 0, n, dt)
            assert torch.equal(bits(full), bits(ref)), dt
            for a, b in ((1, n), (n // 2, n), (0, 1), (n - 1, n)):
                assert torch.equal(bits(nf4.dequantize_rows(q, a, b, dt)), bits(full[a:b])), (a, b)


@pytest.mark.parametrize("n,k", [(48, 48), (5, 96), (4, 32)])
def test_bitsandbytes_cpu_kernel_deviation(n, k):
    """K a multiple of 16 but not of the blocksize: bitsandbytes 0.50's AVX512 CPU dequantize kernel reads the
    wrong per-block scales (about 2x the quantization error); ours is its reference implementation's result
    (``backends.default``: flat blocks, as its quantizer writes them) bit for bit, and closer to the weights."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=g)
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=64, compress_statistics=False,
                          quant_type="nf4")._quantize("cpu")  # fmt: skip
    ours = nf4.dequantize(p)
    ref = _dequantize_4bit_compute(p.data.view(-1), p.quant_state.absmax, p.quant_state.code, 64, (n, k), w.dtype)
    assert torch.equal(ours, ref)
    kernel = bnbF.dequantize_4bit(p.data, p.quant_state)
    if not torch.equal(kernel, ours):  # the kernel's deviation (an AVX512 machine): ours is the better fit
        assert (ours - w).abs().mean() < (kernel - w).abs().mean()


def test_nested_absmax_bit_identical():
    p = params4bit(130, 257, 32, "nf4", True)
    qs = p.quant_state
    ref = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    assert torch.equal(bits(nf4.absmax_fp32(nf4.describe(p))), bits(ref))


def test_describe_shares_storage_and_counts_bytes():
    p = params4bit(256, 500)
    q = nf4.describe(p)
    assert q.packed.data_ptr() == p.data.data_ptr() and q.shape == (256, 500) and q.nested
    # 4 bits + the double-quantized scales + the tables: 0.26x of bf16 at this size
    assert 0.25 * 256 * 500 * 2 < q.nbytes() < 0.27 * 256 * 500 * 2
    assert nf4.is_4bit(p) and nf4.is_4bit(q) and not nf4.is_4bit(torch.zeros(2, 2))


def test_describe_errors_name_the_problem():
    raw = bnb.nn.Params4bit(torch.randn(8, 8), requires_grad=False, quant_type="nf4")  # never moved to a device
    with pytest.raises(ValueError, match="weight is a bitsandbytes 4-bit weight .* not quantized yet"):
        nf4.describe(raw)
    with pytest.raises(TypeError, match="weight must be a bitsandbytes Params4bit"):
        nf4.describe(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="rows .* out of range"):
        nf4.dequantize_rows(nf4.describe(params4bit(4, 8)), 0, 5)


# ---------------------------------------------------------------------------------------------- the torch path
def _lora_args(m, k, n, r, dtype, adapter_dtype=torch.float32, bias=True, lead=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(adapter_dtype)
    bb = (torch.randn(n, r, generator=g) * r**-0.5).to(adapter_dtype)
    return x, b, a, bb


def _run(weight, x, b, a, bb, p=0.0, backend="torch", rm=None, **kw):
    """y and every gradient through lora_linear (the base weight is frozen)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, b, a, bb, rm)]
    x, b, a, bb, rm = leaves
    y = lora_linear(x, weight, b, a, bb, 2.0, p, True, seed=11, backend=backend, lora_R=rm, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    names = [nm for nm, t in zip(("dx", "db", "dA", "dB", "dR"), leaves) if t is not None]
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy)
    return {"y": y.detach(), **dict(zip(names, grads))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "dropout"])
def test_torch_path_is_the_dense_op_on_the_dequantized_weight(dtype, p):
    """One chunk: the 4-bit path computes exactly what the dense torch path computes on bitsandbytes' dequantized
    weight (same calls, bit for bit), with bias, dropout and fp32 adapters together, on a 3-D input."""
    w4 = params4bit(45, 67, 32, "nf4", True)
    x, b, a, bb = _lora_args(0, 67, 45, 3, dtype, lead=(2, 5))
    ours = _run(w4, x, b, a, bb, p)
    dense = _run(nf4.dequantize(w4, dtype), x, b, a, bb, p)
    for name in ours:
        assert torch.equal(ours[name], dense[name]), name


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_forward_matches_bitsandbytes_reference(quant_type, nested):
    """Quantize, then our forward against F.linear on ``bitsandbytes.functional.dequantize_4bit`` + the LoRA term
    (what PEFT computes), under the fp64-oracle rule."""
    w4 = params4bit(70, 100, 64, quant_type, nested)
    x, b, a, bb = _lora_args(13, 100, 70, 5, torch.float32)
    w_ref = bnbF.dequantize_4bit(w4.data, w4.quant_state)
    ours = lora_linear(x, w4, b, a, bb, 2.0, 0.1, True, seed=3, backend="torch")
    ref64 = lora_linear_reference(x.double(), w_ref.double(), b.double(), a.double(), bb.double(), 2.0, 0.1, seed=3)
    peft_like = lora_linear_reference(x, w_ref, b, a, bb, 2.0, 0.1, seed=3)
    assert_close_to_oracle(ours, ref64, peft_like, "y")


def test_chunked_dequant_bounds_transient_memory(monkeypatch):
    w4 = params4bit(45, 67, 64, "nf4", True)
    x, b, a, bb = _lora_args(9, 67, 45, 4, torch.float32)
    whole = _run(w4, x, b, a, bb, 0.1)
    sizes = []
    real = nf4.dequantize_rows

    def spy(q, start, stop, *args, **kw):
        sizes.append(stop - start)
        return real(q, start, stop, *args, **kw)

    import lora_kernels.backends.torch.qlora as qlora

    monkeypatch.setattr(qlora, "dequantize_rows", spy)
    monkeypatch.setenv(nf4.CHUNK_ENV, str(10 * 67))  # 10 rows of W at a time
    chunked = _run(w4, x, b, a, bb, 0.1)
    assert sizes and max(sizes) == 10 and sum(sizes) == 2 * 45  # forward + backward, each row once
    for name in whole:
        assert rel_err(chunked[name], whole[name]) < 1e-6, name
    monkeypatch.setenv(nf4.CHUNK_ENV, "0")
    with pytest.raises(ValueError, match=nf4.CHUNK_ENV):
        _run(w4, x, b, a, bb)


def test_lora_r_on_a_4bit_base():
    w4 = params4bit(24, 40, 32, "fp4", False)
    x, b, a, bb = _lora_args(6, 40, 24, 3, torch.float32)
    rm = torch.randn(3, 3, generator=torch.Generator().manual_seed(5))
    ours = _run(w4, x, b, a, bb, 0.1, rm=rm)
    dense = _run(nf4.dequantize(w4), x, b, a, bb, 0.1, rm=rm)
    for name in ours:
        assert torch.equal(ours[name], dense[name]), name


def test_op_errors_for_4bit_bases():
    w4 = params4bit(8, 16)
    x, b, a, bb = _lora_args(3, 16, 8, 2, torch.float32)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16 with a 4-bit"):
        lora_linear(x.double(), w4, None, a.double(), bb.double(), 1.0)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal weight.shape\[1\]"):
        lora_linear(x[:, :15], w4, None, a[:, :15], bb, 1.0)
    with pytest.raises(TypeError, match="bias dtype must equal x dtype"):
        lora_linear(x, w4, b.double(), a, bb, 1.0)


def test_cuda_backend_refuses_4bit_with_a_reason():
    from lora_kernels.backends.cuda import backend as cuda_backend

    w4 = nf4.describe(params4bit(8, 16))
    x, _, a, bb = _lora_args(3, 16, 8, 2, torch.float32)
    ok, why = cuda_backend.supports(x, w4, None, a, bb, None, LoRAOpts(scale=1.0))
    assert not ok and "4-bit" in why and "triton" in why
    ok, why = cuda_backend.supports(x, torch.zeros(8, 16), None, a, bb, None, LoRAOpts(scale=1.0))
    assert "4-bit" not in why
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run this call"):
        lora_linear(x, w4.source, None, a, bb, 1.0, backend="cuda")


# ------------------------------------------------------------------------------------------------ the layer
def linear4bit(n, k, bias=True, quant_type="nf4", nested=True, seed=0):
    torch.manual_seed(seed)
    lin = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
                            quant_type=quant_type)  # fmt: skip
    return lin.to("cpu")  # bitsandbytes quantizes on the move to a device


def test_layer_keeps_the_base_4bit_and_trains():
    """Dropout, bias and fp32 adapters together; the packed codes are shared and never change; no parameter of
    the layer holds a full-precision copy of W."""
    base = linear4bit(45, 67)
    packed = base.weight.data.clone()
    layer = LoRALinear.from_linear(base, r=3, lora_alpha=6, lora_dropout=0.1)
    assert layer.weight is base.weight and layer.bias is base.bias and layer.lora_A.weight.dtype == torch.float32
    floats = [n for n, p in layer.named_parameters() if p.is_floating_point() and p.numel() >= 45 * 67]
    assert floats == [], floats
    layer.bias.requires_grad_(True)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 7, 67)
    target = torch.randn(4, 7, 45)
    before = layer.lora_B.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), target)
        loss.backward()
        assert layer.lora_B.weight.grad.abs().sum() > 0 and layer.bias.grad is not None  # B = 0 at init: dA = 0 once
        opt.step()
    assert torch.equal(layer.weight.data, packed) and not torch.equal(layer.lora_B.weight, before)
    assert "weight" in layer.state_dict() and layer.state_dict()["weight"].dtype == torch.uint8


@pytest.mark.skipif(not bnbF.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_cpu_inference_layout_is_restored():
    base = linear4bit(64, 128).eval()  # its repacking needs N % 32 == 0 and K % blocksize == 0
    ref, codes = nf4.dequantize(base.weight), base.weight.data.clone()
    with torch.no_grad():
        base(torch.randn(2, 128))  # bitsandbytes' CPU inference path repacks the weight
    assert base.weight.quant_state.packing_format_for_cpu
    layer = LoRALinear.from_linear(base, r=2)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, codes)  # the codes come back exactly; the scales were stored in bf16
    assert ((nf4.dequantize(layer.weight) - ref).abs() <= 2**-8 * ref.abs()).all()  # by bitsandbytes' repacking


def test_layer_merge_refuses_pissa_refuses_subspace_works():
    layer = LoRALinear.from_linear(linear4bit(24, 40), r=2, init_lora_weights=False)
    with pytest.raises(ValueError, match="merge\\(\\) cannot fold an adapter into a 4-bit"):
        layer.merge()
    with pytest.raises(ValueError, match="pissa init rewrites the base weight"):
        LoRALinear.from_linear(linear4bit(24, 40), r=2, init_lora_weights="pissa")
    from lora_kernels.nn.subspace import SubspaceLinear

    sub = SubspaceLinear.from_linear(linear4bit(24, 40), r=3)
    u, s, vh = torch.linalg.svd(nf4.dequantize(sub.weight), full_matrices=False)
    assert torch.allclose(sub.svd_sigma, s[:3], rtol=1e-5)
    sub(torch.randn(5, 40)).sum().backward()
    assert sub.lora_R.grad is not None


def test_merge_lora_requantizes_like_peft():
    model = torch.nn.Sequential(linear4bit(24, 40), torch.nn.ReLU(), linear4bit(16, 24, quant_type="fp4"))
    lora_kernels.apply_lora(model, r=2, init_lora_weights=False)
    with torch.no_grad():
        deltas = [m.delta_weight() for m in lora_kernels.lora_modules(model).values()]
        merged_ref = [nf4.dequantize(m.weight) + d for m, d in zip(lora_kernels.lora_modules(model).values(), deltas)]
    with pytest.warns(UserWarning, match="re-quantizes"):
        lora_kernels.merge_lora(model)
    assert all(isinstance(model[i], bnb.nn.Linear4bit) for i in (0, 2))
    assert [model[i].weight.quant_type for i in (0, 2)] == ["nf4", "fp4"] and model[0].weight.quant_state.nested
    for i, ref in zip((0, 2), merged_ref):  # what PEFT's merge does: bitsandbytes' quantizer on W + delta
        peft_way = bnb.nn.Params4bit(ref, requires_grad=False, blocksize=64, compress_statistics=True,
                                     quant_type=model[i].weight.quant_type)._quantize("cpu")  # fmt: skip
        assert torch.equal(model[i].weight.data, peft_way.data)
        assert torch.equal(nf4.absmax_fp32(nf4.describe(model[i].weight)), nf4.absmax_fp32(nf4.describe(peft_way)))


# ----------------------------------------------------------------------------------- HF models, PEFT, SFT, export
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from lora_kernels.models import tiny_llama

    d = tmp_path_factory.mktemp("tiny4")
    tiny_llama(hidden_size=64, intermediate_size=100).save_pretrained(d)
    return d


def load_4bit(directory, quant_type="nf4", double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=cfg, dtype=torch.float32,
                                                    device_map="cpu")  # fmt: skip


def _loss_and_grads(model, ids, prefix=""):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n.removeprefix(prefix).replace(".default", ""): p.grad for n, p in model.named_parameters()
             if p.requires_grad}  # fmt: skip
    return loss.item(), grads


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_same_loss_and_grads_as_peft_qlora(tiny_dir, tmp_path, quant_type, double_quant):
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    pm = peft.get_peft_model(
        load_4bit(tiny_dir, quant_type, double_quant),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    loss_p, grads_p = _loss_and_grads(pm, ids, "base_model.model.")
    pm.save_pretrained(tmp_path / "peft")
    ours = load_4bit(tiny_dir, quant_type, double_quant)
    res = lora_kernels.load_adapter(ours, tmp_path / "peft")
    assert res.injected and isinstance(ours.model.layers[0].mlp.down_proj.weight, bnb.nn.Params4bit)
    loss_o, grads_o = _loss_and_grads(ours, ids)
    assert abs(loss_o - loss_p) <= 1e-4 * abs(loss_p)
    assert grads_o.keys() == grads_p.keys() and len(grads_o) == 2 * 7 * 2
    worst = max(rel_err(grads_o[k], grads_p[k]) for k in grads_p)
    assert worst < 1e-4, worst


def test_our_adapter_loads_into_peft_with_the_same_loss(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = load_4bit(tiny_dir)
    lora_kernels.apply_lora(ours, r=4, lora_alpha=8, lora_dropout=0.1)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _loss_and_grads(ours, ids)
        opt.step()
    ours.eval()
    with torch.no_grad():
        loss_o = ours(input_ids=ids, labels=ids).loss.item()
    lora_kernels.save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(load_4bit(tiny_dir), tmp_path / "ours").train()
    for mod in pm.modules():  # dropout off, but the Linear4bit bases in training mode: in eval mode on
        if isinstance(mod, torch.nn.Dropout):  # an AVX512-BF16 CPU bitsandbytes repacks them for its inference
            mod.eval()  # kernel, which fails for out_features not a multiple of 32 (here 100)
    loss_p = pm(input_ids=ids, labels=ids).loss.item()
    assert abs(loss_o - loss_p) <= 1e-4 * abs(loss_p)


def test_merge_lora_matches_peft_merge_and_unload(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(
        load_4bit(tiny_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "a")
    ours = load_4bit(tiny_dir)
    lora_kernels.load_adapter(ours, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pm.merge_and_unload()
        lora_kernels.merge_lora(ours)
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert sd_o.keys() == sd_t.keys()
    for name in sd_t:  # the packed codes, the (nested) scales and every full-precision tensor
        assert torch.equal(sd_o[name], sd_t[name]), name


def test_dequantize_model_then_merge_is_the_trained_function(tiny_dir, tmp_path):
    """The QLoRA export: dequantize (no re-quantization), fold the adapters, a plain checkpoint without bitsandbytes
    whose logits are the 4-bit LoRA model's (only fp32 summation order differs)."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    model = load_4bit(tiny_dir)
    lora_kernels.apply_lora(model, r=4, lora_alpha=8, init_lora_weights=False, exclude_modules=["down_proj"])
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)  # 4-bit layers left without adapters
    model.train()  # no dropout here; eval mode would switch bitsandbytes' Linear4bit to its CPU inference kernel
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base_vals = nf4.dequantize(model.model.layers[1].self_attn.q_proj.weight)
    changed = convert.dequantize_model(model)
    assert len(changed) == 14 and not any(nf4.is_params4bit(p) for p in model.parameters())
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, base_vals)  # the values training saw
    lora_kernels.merge_lora(model)
    assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in back.modules())
    with torch.no_grad():
        got = back(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    with pytest.raises(ValueError, match="found no 4-bit"):
        convert.dequantize_model(back)


def test_quantize_model_writes_an_ordinary_hf_4bit_checkpoint(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_kernels.models import tiny_llama

    model = tiny_llama(hidden_size=64, intermediate_size=100)
    report = convert.quantize_model(model, "nf4")
    assert report.kept == ["lm_head"] and len(report.modules) == 14
    assert convert.base_weight_bytes(model) == (report.bytes_4bit, report.bytes_bf16)
    ref = load_4bit(tiny_dir)  # transformers' own quantization of the same weights: the same codes
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    model.save_pretrained(tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert isinstance(back.model.layers[1].self_attn.o_proj, bnb.nn.Linear4bit)
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match="already has bitsandbytes Linear4bit layers"):
        convert.quantize_model(model)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        convert.quantize_model(torch.nn.Linear(4, 4), "int4")
    # the issue's bound on the base weights' memory, on layers of a size where the per-layer tables (~1 KB) do not
    # dominate (SmolLM2-135M's smallest has 110k weights): 0.26x (double quant) and 0.28x of bf16
    for quant_type, dq in (("nf4", True), ("fp4", False)):
        big = tiny_llama(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2)
        assert convert.quantize_model(big, quant_type, double_quant=dq).ratio_to_bf16 <= 0.30


def test_sft_base_dtype_nf4_trains_and_exports(tmp_path, monkeypatch):
    import json

    from lora_kernels.training.sft import runtime

    # fp32 compute (as on a CPU without bf16 instructions): the merged export is then compared with PEFT at 1e-4
    monkeypatch.setattr(runtime, "cpu_bf16_instructions", lambda: None)

    from lora_kernels.training.sft.config import ConfigError, build_config
    from lora_kernels.training.sft.loop import run_sft

    words = "apple river stone cloud seven orange violet copper".split()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {a} {b}", "completion": f"{a} {b}."}) + "\n"
                            for a, b in itertools.product(words, words[:4])))  # fmt: skip
    from transformers import LlamaForCausalLM

    from lora_kernels.models import tiny_random

    # no K that is a multiple of 16 but not of the blocksize (64, 100): bitsandbytes' AVX512 CPU dequantize kernel
    # misplaces the scales there (test_bitsandbytes_cpu_kernel_deviation), which PEFT's forward below would inherit
    model, tok = tiny_random(hidden=64)
    model.config.intermediate_size = 100
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(model.config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ov = dict(model=str(tmp_path / "m"), dataset=str(data), output_dir=str(tmp_path),
              name="q", max_len=48, batch_size=4, max_steps=8, eval_size=8, eval_every=0, save_every=0, lr=3e-2,
              warmup_steps=1, progress=False, plot=False, max_new_tokens=2, sample_prompts=["Say apple"], lora_r=4,
              lora_alpha=8.0, num_threads=1, base_dtype="nf4", merge=True, lora_dropout=0.05)  # fmt: skip
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = run_sft(build_config(overrides=ov), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("frozen base -> nf4" in ln for ln in lines)
    assert any("compute fp32: no bf16 instructions on cpu" in ln for ln in lines), lines
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.5, s
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_kernels.models import load_causal_lm

    # merged/: full precision (dequantized base + adapters, no re-quantization); PEFT puts the adapter on the same
    # 4-bit base (bitsandbytes' quantizer, as at load): the same loss
    merged = AutoModelForCausalLM.from_pretrained(s["outputs"]["merged"], device_map="cpu")
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert getattr(merged.config, "quantization_config", None) is None
    base, _ = load_causal_lm(ov["model"])
    convert.quantize_model(base, "nf4")
    pm = PeftModel.from_pretrained(base, s["outputs"]["adapter"]).train()
    for mod in pm.modules():  # dropout off, the Linear4bit bases in training mode (test_our_adapter_loads_into_peft)
        if isinstance(mod, torch.nn.Dropout):
            mod.eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss_m, loss_p = (m(input_ids=ids, labels=ids).loss.item() for m in (merged, pm))
    assert abs(loss_m - loss_p) <= 1e-4 * abs(loss_p), (loss_m, loss_p)
    for bad, why in (({"base_dtype": "int4"}, "must be one of auto, fp32, bf16, nf4, fp4"),
                     ({"base_dtype": "nf4", "method": "full"}, "applies to the frozen base of a LoRA run"),
                     ({"base_dtype": "fp4", "distributed": "fsdp"}, "not supported with distributed fsdp")):  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            build_config(overrides={**ov, **bad}).validate()
