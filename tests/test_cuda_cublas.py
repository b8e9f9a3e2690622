"""Plan ``cublas`` of the CUDA backend (lora_kernels._C_cublas) on a GPU: `pytest -m gpu tests/test_cuda_cublas.py`.

Against the fp64 torch oracle with the suite's rule (tests/helpers.assert_close_to_oracle: error <= 2x torch's own
error in the same dtypes): odd shapes, fp32/fp16/bf16, fp32 and activation-dtype adapters, dropout, 3-D and
non-contiguous inputs, partial gradients; bit-equality of repeated runs (no atomics); the launches of one call;
CUDA-graph capture and replay; torch.compile(fullgraph=True) through the custom op. The same kernels run on the
CPU under the emulation of tests/test_cuda_cublas_emu.py; what only a GPU shows is here (WMMA, races, cuBLASLt).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    check_backend_against_oracle,
    make_lora_inputs,
    requires_cuda,
    requires_native,
    requires_sm,
    run_lora,
)

from lora_kernels.backends.cuda import cublas, ops

pytestmark = [pytest.mark.gpu, requires_cuda, requires_sm(8, 0), requires_native]

DEV = "cuda"
make_inputs = functools.partial(make_lora_inputs, device=DEV)


@pytest.fixture(autouse=True)
def plan_cublas():
    mod, err = cublas.load()
    if mod is None:
        pytest.fail(f"lora_kernels._C_cublas is not loadable on this GPU machine: {err}")
    with ops.plan("cublas"):
        yield


def check(*inputs, **kw):
    out = check_backend_against_oracle("cuda", *inputs, **kw)
    assert ops.last_plan()["plan"] == "cublas", ops.last_plan()
    return out


SHAPES = [  # (M, K, N, r): M in {1, 7, 129, 300}; K, N off the 64/128 tiles; r in {1, 3, 16, 64}
    pytest.param(1, 40, 72, 1, id="M1-K40-N72-r1"),
    pytest.param(7, 300, 90, 3, id="M7-K300-N90-r3"),
    pytest.param(129, 257, 130, 16, id="M129-K257-N130-r16"),
    pytest.param(300, 136, 264, 64, id="M300-K136-N264-r64"),
    pytest.param(1000, 1030, 520, 5, id="M1000-K1030-N520-r5"),
]
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle(dtype, m, k, n, r, bias):
    check(*make_inputs(m, k, n, r, dtype, bias=bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp32_adapters_and_dropout(dtype):
    check(*make_inputs(257, 200, 136, 16, dtype, adapter_dtype=torch.float32), p=0.1)
    check(*make_inputs(70, 64, 128, 8, dtype), p=0.3, seed=123)


def test_3d_and_non_contiguous():
    x, w, b, a, bb = make_inputs(0, 96, 80, 4, torch.bfloat16, lead=(3, 17))
    check(x, w, b, a, bb, p=0.1)
    check(x.transpose(0, 1), w, b, a, bb)  # copied to rows
    wide = torch.randn(40, 160, device=DEV, dtype=torch.bfloat16)
    check(wide[:, 16:112], w, b, a, bb)  # row stride 160 > K: read in place


@pytest.mark.parametrize("grads", [("x",), ("A",), ("B",), ("b",), ("A", "B"), ("x", "b")])
def test_partial_grads(grads):
    check(*make_inputs(130, 72, 100, 6, torch.float16), p=0.2, grads=grads)


def test_expanded_grad_and_m_zero():
    x, w, b, a, bb = make_inputs(20, 40, 24, 3, torch.bfloat16)
    check(x, w, b, a, bb, g=torch.ones(1, 1, device=DEV, dtype=torch.bfloat16).expand(20, 24))
    out = run_lora("cuda", x[:0], w, b, a, bb)
    assert out["y"].shape == (0, 24) and float(out["dA"].abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bit_reproducible(dtype):
    """Fixed-order reductions, no atomics: repeated runs (and deterministic=True) are bit-identical."""
    x, w, b, a, bb = make_inputs(1500, 520, 300, 16, dtype, adapter_dtype=torch.float32)
    r1 = run_lora("cuda", x, w, b, a, bb, p=0.1)
    r2 = run_lora("cuda", x, w, b, a, bb, p=0.1)
    r3 = run_lora("cuda", x, w, b, a, bb, p=0.1, deterministic=True)
    for name in r1:
        assert torch.equal(r1[name], r2[name]) and torch.equal(r1[name], r3[name]), name


def test_launch_counts():
    """Ours as the module says (fwd_launches / bwd_launches minus the GEMMs), at least one kernel per GEMM."""
    from torch.profiler import ProfilerActivity, profile

    C = cublas.load()[0]
    x, w, b, a, bb = make_inputs(256, 512, 384, 16, torch.bfloat16)
    run_lora("cuda", x, w, b, a, bb)  # warm: handles, plans
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_lora("cuda", x, w, b, a, bb)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if any(k in n for k in ("rank_reduce", "lowrank_add", "gpass", "reduce_kernel"))]
    assert len(ours) == (C.fwd_launches(256) - 1) + (C.bwd_launches(256, True, True, True, True) - 1), names
    assert len([n for n in names if not any(k in n.lower() for k in ("memset", "memcpy"))]) >= len(ours) + 2, names


def test_cuda_graph_capture_and_replay():
    """One warm call, then fwd+bwd captured into a CUDA graph and replayed: same bits as eager."""
    x, w, b, a, bb = make_inputs(512, 256, 192, 16, torch.bfloat16, adapter_dtype=torch.float32)
    a.requires_grad_()
    bb.requires_grad_()
    g = torch.randn(512, 192, device=DEV, dtype=torch.bfloat16)
    from lora_kernels.functional import lora_linear

    def step():
        y = lora_linear(x, w, b, a, bb, 2.0, 0.1, seed=3, backend="cuda")
        return (y, *torch.autograd.grad(y, [a, bb], g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [t.clone() for t in step()]  # warm-up outside capture (cuBLASLt handle, plans)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    graph.replay()
    torch.cuda.synchronize()
    for e, o in zip(eager, outs):
        assert torch.equal(e, o)


def test_torch_compile_fullgraph():
    from lora_kernels.backends import LoRAOpts
    from lora_kernels.backends.cuda.backend import apply

    x, w, b, a, bb = make_inputs(64, 96, 80, 8, torch.bfloat16)
    a.requires_grad_()
    opts = LoRAOpts(scale=2.0, dropout_p=0.1, seed=4)
    fn = lambda x: apply(x, w, b, a, bb, None, opts)
    y_eager = fn(x)
    (ga_eager,) = torch.autograd.grad(y_eager.float().sum(), [a])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    (ga,) = torch.autograd.grad(y.float().sum(), [a])
    assert torch.equal(y, y_eager) and torch.equal(ga, ga_eager)


def test_rank_above_64_is_refused_with_reason():
    x, w, b, a, bb = make_inputs(8, 64, 64, 65, torch.bfloat16)
    from lora_kernels import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"plan 'cublas' supports ranks r <= 64, got r=65"):
        run_lora("cuda", x, w, b, a, bb)
