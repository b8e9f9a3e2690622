"""CUDA backend (lora_kernels._C) against the fp64 torch oracle, on a GPU (`pytest -m gpu tests/test_cuda_kernels.py`).

Tolerance rule (tests/helpers.assert_close_to_oracle): the kernel's max error against the fp64 evaluation of the
torch backend must be <= 2x the torch backend's own max error in the same dtypes, plus an atol of 1e-6 relative to
the output's magnitude (covers outputs torch computes exactly, e.g. db with M=1). The kernels accumulate in fp32
and round once at the store, torch rounds its intermediates (XA, GB) to the activation dtype: the CUDA error is
expected below torch's, the factor 2 is headroom for a different summation order.

Skips are distinct: no GPU / GPU older than sm_80 / extension not built.
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

import lora_kernels
from lora_kernels.backends import mask as _rng
from lora_kernels.functional import lora_linear

pytestmark = [pytest.mark.gpu, requires_cuda, requires_sm(8, 0), requires_native]

DEV = "cuda"


# ---------------------------------------------------------------------------------------------- helpers
make_inputs = functools.partial(make_lora_inputs, device=DEV)
run = run_lora
check_against_oracle = functools.partial(check_backend_against_oracle, "cuda")


def cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels `fn` launches (memsets/memcpys excluded), via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [nm for nm in names if not nm.lower().startswith(("memset", "memcpy"))]


def ours(names: list[str]) -> list[str]:
    """Our kernels: lora_fwd_kernel / lora_fwd_pipe_kernel, lora_bwd_kernel / lora_bwd_pipe_kernel, lora_bwd_reduce."""
    return [nm for nm in names if "lora_fwd" in nm or "lora_bwd" in nm]


# ---------------------------------------------------------------------------------------------- oracle matrix
SHAPES = [  # (M, K, N, r): M in {1, 7, 129}; K, N never multiples of the 32/128-wide tiles; r in {1, 3, 16, 100}
    pytest.param(1, 40, 72, 1, id="M1-K40-N72-r1"),
    pytest.param(7, 100, 90, 3, id="M7-K100-N90-r3"),
    pytest.param(129, 257, 130, 16, id="M129-K257-N130-r16"),
    pytest.param(33, 65, 300, 100, id="M33-K65-N300-r100"),
    pytest.param(200, 136, 260, 16, id="M200-K136-N260-r16"),
]
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.float16, torch.bfloat16)]
MODES = [pytest.param(False, id="atomic"), pytest.param(True, id="deterministic")]


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle(dtype, m, k, n, r, bias, deterministic):
    check_against_oracle(*make_inputs(m, k, n, r, dtype, bias=bias), deterministic=deterministic)


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_oracle(dtype, deterministic):
    """The torch path regenerates the same mask from (seed, offset): a different mask would miss by O(1)."""
    check_against_oracle(*make_inputs(70, 100, 90, 5, dtype), p=0.3, seed=123, offset=11, deterministic=deterministic)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_adapters_low_precision_activations(dtype):
    cu = check_against_oracle(*make_inputs(50, 100, 70, 8, dtype, adapter_dtype=torch.float32), p=0.2)
    assert cu["dA"].dtype == cu["dB"].dtype == torch.float32 and cu["y"].dtype == dtype


def test_3d_input():
    check_against_oracle(*make_inputs(0, 72, 40, 4, torch.bfloat16, lead=(3, 23)))


@pytest.mark.parametrize("layout", ["transposed-2d", "transposed-3d", "sliced-3d"])
def test_non_contiguous_input(layout):
    x, w, b, a, bb = make_inputs(0, 72, 40, 4, torch.float16, lead=(2, 21))
    if layout == "transposed-2d":
        x = x.reshape(42, 72).t().contiguous().t()  # strides (1, 42): the kernel reads it strided
    elif layout == "transposed-3d":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # no 2-D view: reshape copies (documented)
    else:
        x = torch.cat([x, x], dim=-1)[..., ::2]  # stride 2 along K, rows flatten to a strided 2-D view
    assert not x.is_contiguous()
    check_against_oracle(x, w, b, a, bb, p=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_256(dtype):
    check_against_oracle(*make_inputs(20, 64, 40, 256, dtype), p=0.1)


@pytest.mark.parametrize("r", [64, 65], ids=["r64-small-instance", "r65-large-instance"])
def test_rank_instance_boundary(r):
    """r <= 64 runs the 2-fragments-per-warp kernels (128 registers), r > 64 the 8-fragment ones."""
    check_against_oracle(*make_inputs(70, 136, 150, r, torch.bfloat16), p=0.1)
    check_against_oracle(*make_inputs(70, 136, 150, r, torch.float32), deterministic=True)


def test_only_needed_grads():
    """x frozen (first layer: the kernel skips the G·W MMA), or only dx, or only the bias grad."""
    check_against_oracle(*make_inputs(40, 70, 50, 4, torch.float32), grads=("A", "B"))
    check_against_oracle(*make_inputs(40, 70, 50, 4, torch.bfloat16), grads=("A", "B"))
    check_against_oracle(*make_inputs(40, 70, 50, 4, torch.float32), grads=("x",))
    check_against_oracle(*make_inputs(40, 70, 50, 4, torch.float32), grads=("b",))


def test_trainable_base_weight():
    """Full fine-tuning: dW = Gᵀ X from cuBLAS next to the fused kernel."""
    check_against_oracle(*make_inputs(30, 70, 50, 4, torch.bfloat16), grads=("x", "W", "b", "A", "B"))


def test_expanded_grad():
    """y.sum().backward() hands the op a stride-0 grad: the kernel reads it through its strides."""
    x, w, b, a, bb = make_inputs(9, 40, 33, 4, torch.float32)
    g = torch.ones(1, 1, device=DEV).expand(9, 33)
    assert g.stride() == (0, 0)
    check_against_oracle(x, w, b, a, bb, g=g)


def test_m_zero_launches_nothing():
    x, w, b, a, bb = make_inputs(0, 40, 30, 4, torch.float32, lead=(0, 5))
    box = {}
    names = cuda_kernels(lambda: box.update(run("cuda", x, w, b, a, bb)))
    assert ours(names) == []
    out = box
    assert out["y"].shape == (0, 5, 30) and out["dx"].shape == x.shape
    for name in ("db", "dA", "dB"):
        assert torch.count_nonzero(out[name]) == 0, name


# ---------------------------------------------------------------------------------------------- dropout mask bits
@pytest.mark.parametrize(
    "seed, offset",
    [(5, 0), (2**40 + 5, 2**32 - 1000), (2**63 - 1, 123)],
    ids=["small", "offset-wraps-32bit", "maxseed"],
)
def test_dropout_mask_equals_rng(seed, offset):
    """The forward's and the backward's masks, read back exactly, equal lora_kernels.backends.mask.dropout_keep_mask.

    Forward: x = 1, W = 0, A = B = I (r = K = N) -> y = s · Z / (1-p).
    Backward: G = 1, W = 0, B = 1, A = 1 (r = 1) -> dx = s · N · Z / (1-p).
    """
    m, k, p = 129, 200, 0.3
    opts = dict(seed=seed, offset=offset)
    x = torch.ones(m, k, device=DEV)
    eye = torch.eye(k, device=DEV)
    y = lora_linear(x, torch.zeros(k, k, device=DEV), None, eye, eye, 1.0, p, backend="cuda", **opts)
    want = _rng.dropout_keep_mask(seed, offset, m, k, p, device=DEV)
    assert torch.equal(y != 0, want), "forward mask differs from lora_kernels.backends.mask"
    assert torch.allclose(y[want], torch.full_like(y[want], 1.0 / (1.0 - p)))

    k2, n2 = 300, 8
    x2 = torch.ones(m, k2, device=DEV, requires_grad=True)
    y2 = lora_linear(
        x2,
        torch.zeros(n2, k2, device=DEV),
        None,
        torch.ones(1, k2, device=DEV),
        torch.ones(n2, 1, device=DEV),
        1.0,
        p,
        backend="cuda",
        **opts,
    )
    (dx,) = torch.autograd.grad(y2, [x2], torch.ones_like(y2))
    want2 = _rng.dropout_keep_mask(seed, offset, m, k2, p, device=DEV)
    assert torch.equal(dx != 0, want2), "backward mask differs from lora_kernels.backends.mask"


# ---------------------------------------------------------------------------------------------- determinism, launches
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_mode_is_bit_reproducible(dtype):
    inputs = make_inputs(300, 520, 390, 16, dtype)
    first = run("cuda", *inputs, p=0.1, deterministic=True)
    for _ in range(2):
        again = run("cuda", *inputs, p=0.1, deterministic=True)
        for name in first:
            assert torch.equal(first[name], again[name]), f"{name} differs between deterministic runs"
    check_against_oracle(*inputs, p=0.1, deterministic=True)


@pytest.mark.parametrize("deterministic", MODES)
def test_launch_counts(deterministic):
    """Forward: one kernel in all. Backward: one kernel (atomics) or two (deterministic), nothing else."""
    x, w, b, a, bb = make_inputs(0, 300, 200, 8, torch.bfloat16, lead=(3, 50))
    x.requires_grad_(True), a.requires_grad_(True), bb.requires_grad_(True)
    g = torch.randn(3, 50, 200, device=DEV, dtype=torch.bfloat16)
    box = {}

    def fwd():
        box["y"] = lora_linear(x, w, b, a, bb, 2.0, 0.1, seed=3, backend="cuda", deterministic=deterministic)

    fwd_names = cuda_kernels(fwd)
    assert len(fwd_names) == 1 and "lora_fwd" in fwd_names[0], fwd_names
    bwd_names = cuda_kernels(lambda: box["y"].backward(g))
    want = 2 if deterministic else 1
    assert len(ours(bwd_names)) == want, bwd_names
    assert len(bwd_names) == want, f"extra kernels in backward: {bwd_names}"


def test_realistic_bf16():
    """M=8192 tokens, K=N=4096, r=16, bf16 with fp32 adapters (PEFT's default), dropout 0.05, both modes."""
    inputs = make_inputs(8192, 4096, 4096, 16, torch.bfloat16, adapter_dtype=torch.float32, bias=False)
    check_against_oracle(*inputs, p=0.05)
    check_against_oracle(*inputs, p=0.05, deterministic=True)


# ---------------------------------------------------------------------------------------------- kernel policies
# Both main loops (csrc/lora_pipe.cuh: cp.async + mma.sync; the simple WMMA loop) at shapes where the pipelined one
# qualifies (K, N multiples of 8): M, K, N tails of the 128/128/32 tiles, a reduction shorter than the 4-stage ring
# (K=40: 2 tiles) and longer (K=520: 17 tiles), r in {3, 16} (pipelined) and 100 (r > 64: simple, and says so).
POLICY_SHAPES = [
    pytest.param(1, 40, 72, 3, id="M1-K40-N72-r3"),
    pytest.param(129, 264, 136, 16, id="M129-K264-N136-r16"),
    pytest.param(257, 520, 392, 16, id="M257-K520-N392-r16"),
    pytest.param(70, 136, 264, 100, id="M70-K136-N264-r100"),
]
POLICIES = ["simple", "pipelined", "pipelined-bk64"]  # bk64: LORA_KERNELS_CUDA_BK=64 (3 stages of BK=64)


def set_policy(monkeypatch, policy: str) -> None:
    monkeypatch.setenv("LORA_KERNELS_CUDA_KERNEL", policy.removesuffix("-bk64"))
    monkeypatch.setenv("LORA_KERNELS_CUDA_BK", "64" if policy.endswith("-bk64") else "32")


def expect_path(policy: str, r: int, dtype: torch.dtype) -> str:
    """'pipelined' or the prefix of the simple path's reason (lora_kernels._C.last_path())."""
    if policy == "simple" or dtype == torch.float32 or r > 64:
        return "simple"
    return "pipelined"


def check_path(want: str, bwd: bool = True) -> None:
    from lora_kernels.backends.cuda.backend import last_path

    got = last_path()
    assert got["fwd"].startswith(want), got
    if bwd:
        assert got["bwd"].startswith(want), got


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "p, bias, deterministic",
    [(0.0, True, False), (0.2, False, True), (0.2, True, False)],
    ids=["bias-atomic", "dropout-nobias-det", "dropout-bias-atomic"],
)
@pytest.mark.parametrize("m,k,n,r", POLICY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_policy_matches_oracle(monkeypatch, policy, dtype, m, k, n, r, p, bias, deterministic):
    set_policy(monkeypatch, policy)
    inputs = make_inputs(m, k, n, r, dtype, adapter_dtype=torch.float32 if p else dtype, bias=bias)
    check_against_oracle(*inputs, p=p, seed=5, offset=3, deterministic=deterministic)
    check_path(expect_path(policy, r, dtype))


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_fallbacks_are_reported(monkeypatch, policy):
    """Odd K (no 16-byte rows), a strided x and an expanded grad take the simple loop and say why."""
    set_policy(monkeypatch, policy)
    from lora_kernels.backends.cuda.backend import last_path

    check_against_oracle(*make_inputs(70, 100, 136, 16, torch.bfloat16), p=0.1)  # K % 8 != 0
    assert last_path()["fwd"].startswith("simple") and last_path()["bwd"].startswith("simple")
    x, w, b, a, bb = make_inputs(0, 72, 40, 4, torch.bfloat16, lead=(2, 21))
    x = torch.cat([x, x], dim=-1)[..., ::2]  # stride 2 along K
    check_against_oracle(x, w, b, a, bb)
    assert last_path()["fwd"].startswith("simple"), last_path()
    g = torch.ones(1, 1, device=DEV, dtype=torch.bfloat16).expand(9, 40)  # stride-0 grad
    check_against_oracle(*make_inputs(9, 72, 40, 4, torch.bfloat16), g=g)
    assert last_path()["bwd"].startswith("simple"), last_path()
    assert last_path()["fwd"].startswith(expect_path(policy, 4, torch.bfloat16)), last_path()


def test_policy_bad_value_raises(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CUDA_KERNEL", "fast")
    with pytest.raises(ValueError, match="LORA_KERNELS_CUDA_KERNEL"):
        run("cuda", *make_inputs(5, 40, 32, 4, torch.bfloat16))
    monkeypatch.setenv("LORA_KERNELS_CUDA_KERNEL", "pipelined")
    monkeypatch.setenv("LORA_KERNELS_CUDA_BK", "48")
    with pytest.raises(ValueError, match="LORA_KERNELS_CUDA_BK"):
        run("cuda", *make_inputs(5, 40, 32, 4, torch.bfloat16))


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_deterministic_bit_reproducible(monkeypatch, policy):
    set_policy(monkeypatch, policy)
    inputs = make_inputs(300, 520, 392, 16, torch.bfloat16, adapter_dtype=torch.float32)
    first = run("cuda", *inputs, p=0.1, deterministic=True)
    check_path(expect_path(policy, 16, torch.bfloat16))
    again = run("cuda", *inputs, p=0.1, deterministic=True)
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name} differs between deterministic runs"


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_launch_counts(monkeypatch, policy):
    """The pipelined kernels keep the launch budget: forward one kernel, backward one (atomics)."""
    set_policy(monkeypatch, policy)
    x, w, b, a, bb = make_inputs(0, 264, 200, 8, torch.bfloat16, lead=(3, 50))
    x.requires_grad_(True), a.requires_grad_(True), bb.requires_grad_(True)
    g = torch.randn(3, 50, 200, device=DEV, dtype=torch.bfloat16)
    box = {}

    def fwd():
        box["y"] = lora_linear(x, w, b, a, bb, 2.0, 0.1, seed=3, backend="cuda")

    fwd_names = cuda_kernels(fwd)
    want_name = "pipe" if policy.startswith("pipelined") else "lora_fwd_kernel"
    assert len(fwd_names) == 1 and want_name in fwd_names[0], fwd_names
    bwd_names = cuda_kernels(lambda: box["y"].backward(g))
    assert len(bwd_names) == 1 and ("pipe" in bwd_names[0]) == policy.startswith("pipelined"), bwd_names


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_realistic_shape(monkeypatch, policy):
    """M=2048 tokens, K=N=4096, r=16, bf16 activations with fp32 adapters, dropout: the benchmark's shape family."""
    set_policy(monkeypatch, policy)
    inputs = make_inputs(2048, 4096, 4096, 16, torch.bfloat16, adapter_dtype=torch.float32, bias=False)
    check_against_oracle(*inputs, p=0.05)
    check_path(expect_path(policy, 16, torch.bfloat16))


# ---------------------------------------------------------------------------------------------- selection
def test_backend_selection_and_refusals():
    x, w, b, a, bb = make_inputs(5, 40, 30, 4, torch.bfloat16)
    assert lora_kernels.backend_info()["backends"]["cuda"]["available"]
    lora_linear(x, w, b, a, bb, 1.0, backend="cuda")
    with pytest.raises(lora_kernels.BackendUnavailableError, match="float64"):
        lora_linear(x.double(), w.double(), None, a.double(), bb.double(), 1.0, backend="cuda")
    r_mid = torch.eye(4, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(lora_kernels.BackendUnavailableError, match="lora_R"):
        lora_linear(x, w, b, a, bb, 1.0, lora_R=r_mid, backend="cuda")
    with pytest.raises(lora_kernels.BackendUnavailableError, match="r <= 256"):
        a5, b5 = make_inputs(5, 40, 30, 257, torch.bfloat16)[3:]
        lora_linear(x, w, b, a5, b5, 1.0, backend="cuda")
