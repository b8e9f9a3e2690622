"""The CPU native 4-bit dequantization (lora_kernels._cpu.dequant_4bit, used by the torch QLoRA path) equals the
torch ops of lora_kernels.quant.nf4 bit for bit (which equal bitsandbytes: tests/test_qlora.py), for every output
dtype, NF4/FP4, nested scales, blocksizes, odd shapes and row ranges that start and end inside blocks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from test_qlora import params4bit  # noqa: E402

from lora_kernels.backends.torch import native, qlora  # noqa: E402
from lora_kernels.quant import nf4  # noqa: E402


def _lib_or_skip():
    ok, why = native.status()
    if not ok:
        pytest.skip(f"native CPU module unavailable: {why}")
    return native.module()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "n,k,bs,qt,nested", [(45, 67, 32, "nf4", True), (70, 100, 64, "fp4", False), (9, 130, 128, "nf4", False)]
)
def test_native_dequant_equals_torch_ops(dtype, n, k, bs, qt, nested):
    _lib_or_skip()
    q = nf4.describe(params4bit(n, k, bs, qt, nested))
    absmax = nf4.absmax_fp32(q)
    for start, stop in [(0, n), (1, n - 1), (n // 2, n // 2 + 1), (3, 3)]:
        got = qlora.dequantize_rows(q, start, stop, dtype, absmax)
        ref = nf4.dequantize_rows(q, start, stop, dtype, absmax)
        assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
        assert torch.equal(got, ref), (start, stop)


def test_native_dequant_is_used_and_many_threads_agree(monkeypatch):
    lib = _lib_or_skip()
    q = nf4.describe(params4bit(300, 257, 64, "nf4", True))  # > 2**15 elements: the parallel split runs
    absmax = nf4.absmax_fp32(q)
    ref = nf4.dequantize_rows(q, 5, 290, torch.bfloat16, absmax)
    calls = []
    real = lib.dequant_4bit

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def dequant_4bit(self, *a):
            calls.append(a[-1])
            return real(*a)

    monkeypatch.setattr(native, "module", lambda: Spy())
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert torch.equal(qlora.dequantize_rows(q, 5, 290, torch.bfloat16, absmax), ref)
    assert calls == [1, 2, 3]


def test_native_dequant_errors_name_the_argument():
    lib = _lib_or_skip()
    with pytest.raises(ValueError, match="e1 must be >= e0"):
        lib.dequant_4bit(8, 8, 8, 8, 5, 4, 64, 0, 1)
    with pytest.raises(ValueError, match="blocksize must be an even number"):
        lib.dequant_4bit(8, 8, 8, 8, 0, 4, 3, 0, 1)
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        lib.dequant_4bit(8, 8, 8, 8, 0, 4, 64, 3, 1)
    with pytest.raises(ValueError, match="packed must be a non-null address"):
        lib.dequant_4bit(0, 8, 8, 8, 0, 4, 64, 0, 1)
