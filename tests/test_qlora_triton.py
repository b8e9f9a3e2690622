"""The Triton backend on 4-bit (bitsandbytes NF4/FP4) bases, under the interpreter on odd shapes: the 4-bit GEMM
(W dequantized in registers) + the library plan's LoRA kernels, against the torch path and the fp64 oracle."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_oracle, requires_triton

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'lora_kernels[qlora]')")

from lora_kernels import LoRALinear  # noqa: E402
from lora_kernels.backends import LoRAOpts  # noqa: E402
from lora_kernels.functional import lora_linear  # noqa: E402
from lora_kernels.quant import nf4  # noqa: E402

pytestmark = requires_triton


def params4bit(n, k, blocksize=64, quant_type="nf4", nested=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    return bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                             quant_type=quant_type)._quantize("cpu")  # fmt: skip


def inputs(m, k, n, r, dtype, adapter_dtype, lead=None, bias=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(adapter_dtype)
    bb = (torch.randn(n, r, generator=g) * r**-0.5).to(adapter_dtype)
    gy = torch.randn(*x.shape[:-1], n, generator=g).to(dtype)
    return x, b, a, bb, gy


def run(weight, x, b, a, bb, gy, p, backend, rm=None, **kw):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, b, a, bb, rm)]
    y = lora_linear(leaves[0], weight, leaves[1], leaves[2], leaves[3], 2.0, p, True, seed=9, backend=backend,
                    lora_R=leaves[4], **kw)  # fmt: skip
    names = [nm for nm, t in zip(("dx", "db", "dA", "dB", "dR"), leaves) if t is not None]
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy.to(y.dtype))
    return {"y": y.detach(), **dict(zip(names, grads))}


def check(w4, x, b, a, bb, gy, p, rm=None, **kw):
    """Triton vs the fp64 evaluation on the dequantized weight, bound by the torch 4-bit path's own error."""
    out = run(w4, x, b, a, bb, gy, p, "triton", rm, **kw)
    tor = run(w4, x, b, a, bb, gy, p, "torch", rm, **kw)
    w64 = nf4.dequantize(w4, x.dtype).double()  # the op's weight: bitsandbytes' value in the activation dtype
    up = [t.double() if t is not None else None for t in (x, b, a, bb, gy, rm)]
    ref = run(w64, *up[:5], p, "torch", up[5])
    assert out.keys() == tor.keys() == ref.keys()
    for name in out:
        assert out[name].dtype == tor[name].dtype and out[name].shape == tor[name].shape, name
        atol = 1e-6 * max(ref[name].abs().max().item() if ref[name].numel() else 0.0, 1.0)
        assert_close_to_oracle(out[name], ref[name], tor[name], name, atol=atol)
    return out


CASES = [  # (m, k, n, r, blocksize, quant_type, nested): K not a multiple of the blocksize (blocks span rows), odd K
    (37, 67, 45, 3, 32, "nf4", True),
    (1, 33, 17, 1, 64, "fp4", False),
    (20, 100, 70, 5, 128, "nf4", False),
    (70, 129, 66, 16, 4096, "fp4", True),
]


@pytest.mark.parametrize("m,k,n,r,blocksize,quant_type,nested", CASES)
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
    ids=["fp32", "bf16-fp32adapters", "fp16"],
)
def test_matches_torch_path_dropout_bias_fp32_adapters(m, k, n, r, blocksize, quant_type, nested, dtype,
                                                       adapter_dtype):  # fmt: skip
    w4 = params4bit(n, k, blocksize, quant_type, nested)
    check(w4, *inputs(m, k, n, r, dtype, adapter_dtype), p=0.1)


@pytest.mark.parametrize("layout", ["3d", "transposed-3d", "no-bias-p0"])
def test_3d_and_non_contiguous_inputs(layout):
    w4 = params4bit(45, 67, 32)
    if layout == "no-bias-p0":
        check(w4, *inputs(0, 67, 45, 3, torch.bfloat16, torch.float32, lead=(3, 5), bias=False), p=0.0)
        return
    x, b, a, bb, gy = inputs(0, 67, 45, 3, torch.float32, torch.float32, lead=(4, 6))
    if layout == "transposed-3d":
        x, gy = x.transpose(0, 1), gy.transpose(0, 1)
        assert not x.is_contiguous()
    check(w4, x, b, a, bb, gy, p=0.2)


def test_lora_r_and_deterministic():
    w4 = params4bit(45, 67, 64, "nf4", True)
    x, b, a, bb, gy = inputs(70, 67, 45, 3, torch.float32, torch.float32)
    rm = torch.randn(3, 3, generator=torch.Generator().manual_seed(4))
    first = check(w4, x, b, a, bb, gy, 0.1, rm, deterministic=True)
    again = run(w4, x, b, a, bb, gy, 0.1, "triton", rm, deterministic=True)
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_no_full_precision_weight_and_launch_budget(monkeypatch):
    """The Triton path never calls the torch dequantization (W is dequantized only in registers): 2 launches
    forward (XA; the 4-bit GEMM + epilogue), 3 backward (dX = G W; GB; the epilogue)."""
    import lora_kernels.backends.torch.qlora as torch_qlora
    from lora_kernels.backends.triton import launch_counter

    def refuse(*args, **kw):
        raise AssertionError("the triton 4-bit path dequantized W in torch")

    monkeypatch.setattr(nf4, "dequantize_rows", refuse)
    monkeypatch.setattr(torch_qlora, "dequantize_rows", refuse)
    w4 = params4bit(45, 67, 32)
    x, b, a, bb, gy = inputs(37, 67, 45, 3, torch.float32, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (x, b, a, bb)]
    with launch_counter() as c:
        y = lora_linear(leaves[0], w4, leaves[1], leaves[2], leaves[3], 2.0, 0.1, True, seed=1, backend="triton")
    assert c.count == 2 and c.library == 0, c.kernels
    with launch_counter() as c:
        y.backward(gy)
    assert c.count == 3 and c.library == 0, c.kernels
    assert c.kernels.count("nf4_gemm_kernel") == 1


def test_layer_routes_its_4bit_base_to_triton():
    """A LoRALinear on a Linear4bit with backend='triton' runs exactly the functional Triton 4-bit path."""
    lin = bnb.nn.Linear4bit(67, 45, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer = LoRALinear.from_linear(lin, r=3, lora_dropout=0.1, init_lora_weights=False, backend="triton")
    x = torch.randn(2, 5, 67)
    torch.manual_seed(3)  # the dropout seed drawn by the call
    y = layer(x)
    torch.manual_seed(3)
    want = lora_linear(x, lin.weight, lin.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, 0.1, True,
                       backend="triton")  # fmt: skip
    assert torch.equal(y, want)


def test_supports_names_the_4bit_path():
    from lora_kernels.backends.triton import backend as triton_backend

    w4 = nf4.describe(params4bit(8, 16))
    x, _, a, bb, _ = inputs(3, 16, 8, 2, torch.float32, torch.float32)
    ok, why = triton_backend.supports(x, w4, None, a, bb, None, LoRAOpts(scale=1.0))
    assert ok and "4-bit" in why and "nf4" in why
