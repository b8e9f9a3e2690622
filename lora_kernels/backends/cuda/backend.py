"""The ``cuda`` backend: an autograd Function around the CUDA kernels of ``lora_kernels._C`` (csrc/).

The binding links no libtorch: this module hands it each tensor's ``data_ptr()``, sizes, element strides, a dtype
code, the device index and the current stream as plain ints. Launch plan (csrc/README.md):

* forward: one launch writes ``y`` and ``xa = dropout(x) Aᵀ`` (fp32, saved for backward);
* backward: one launch for ``dx, dA, dB, db`` (fp32 atomics), or two without atomics when
  ``opts.deterministic`` (bit-reproducible). ``dW`` (full fine-tuning only) is ``Gᵀ X`` computed here with torch:
  the frozen-base case, the one this package is for, never pays for it.

Main loop: ``LORA_KERNELS_CUDA_KERNEL=simple|pipelined`` (read by the extension at every call; default
``lora_kernels._C.DEFAULT_KERNEL``). ``pipelined`` (cp.async ring + mma.sync, csrc/lora_pipe.cuh) runs for fp16/bf16
with r <= 64 and 16-byte aligned rows, the simple kernels otherwise; ``last_path()`` says which ran and why.

Saved for backward: the input (as its 2-D view), the parameters and ``xa``; the dropout mask is regenerated in the
backward kernel from ``(seed, offset)``, never stored.

Not supported (``supports`` says so and ``auto`` moves on): the ``lora_R`` middle matrix, fp64, ranks above 256,
GPUs older than sm_80.
"""

from __future__ import annotations

import importlib

import torch

from .. import mask as _rng
from ..base import BackendUnavailableError, LoRAOpts

# GPU verification record, updated by hand after a run of `pytest -m gpu tests/test_cuda_*.py` on a real GPU.
# None = never run on a GPU: the kernels compile (sm_80, sm_90) and the CPU-side checks pass, nothing more.
# `auto`'s order on a GPU is set from measurements in backends/heuristics.py (cuda is last: slowest today).
VERIFIED_ON_GPU: str | None = (
    "NVIDIA H200, 2026-11-30, run 4 (benchmarks/results/h200_20261130_run4, commit 647f198): every CUDA GPU test "
    "passes, simple and pipelined policies, incl. run 3's three dB failures at M=1 (fixed by rounding XA to the "
    "activation dtype before the dB product); compute-sanitizer memcheck 0 errors and racecheck 0 hazards on "
    "csrc/sanitize_check.py (both policies, fp32/bf16/fp16, atomic and deterministic). Runs 1 and 3 before it"
)

BUILD_HINT = (
    "build it with `LORA_KERNELS_CUDA_ARCHS=90 python setup.py build_ext --inplace` "
    "(or `pip install -e . --no-build-isolation`; needs nvcc, CMake >= 3.18, pybind11)"
)
MAX_RANK = 256
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_native = None
_native_error: str | None = None


def _load_native():
    """Import ``lora_kernels._C`` once; return ``(module or None, error text)``. Never initialises CUDA."""
    global _native, _native_error
    if _native is None and _native_error is None:
        try:
            _native = importlib.import_module("lora_kernels._C")
        except ImportError as exc:
            _native_error = str(exc)
    return _native, _native_error


def _require_native():
    mod, err = _load_native()
    if mod is None:
        raise BackendUnavailableError(f"lora_kernels._C not built ({err}): {BUILD_HINT}")
    return mod


def availability() -> tuple[bool, str]:
    """Cheap: imports the extension (no CUDA call) and asks torch whether a device exists."""
    mod, err = _load_native()
    if mod is None:
        return False, f"lora_kernels._C not built: {BUILD_HINT} (import error: {err})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "lora_kernels._C is built and a CUDA device is present"


def supports(x, weight, bias, lora_A, lora_B, lora_R, opts) -> tuple[bool, str]:
    if x.device.type != "cuda":
        return False, f"the CUDA kernels need CUDA tensors, got x on {x.device}"
    if x.dtype not in _DTYPE_CODES:
        return False, f"the CUDA kernels support float32/float16/bfloat16 activations, got {x.dtype}"
    if lora_R is not None:
        return False, "lora_R (middle r x r matrix) is not implemented in the CUDA kernels (use 'torch' or 'triton')"
    r = lora_A.shape[0]
    if r > MAX_RANK:
        return False, f"the CUDA kernels support ranks r <= {MAX_RANK}, got r={r}"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major < 8:
        return False, f"the CUDA kernels need compute capability >= 8.0 (bf16 tensor cores), got {major}.{minor}"
    return True, "fused CUDA kernels"


def last_path() -> dict[str, str]:
    """Which main loop the last forward / backward call took: ``{"fwd": ..., "bwd": ...}``, each ``"pipelined"``
    or ``"simple (<reason>)"`` (``"none"`` before the first call).

    The policy is ``LORA_KERNELS_CUDA_KERNEL=simple|pipelined`` (read by the extension at each call; default
    ``lora_kernels._C.DEFAULT_KERNEL``). ``pipelined`` (csrc/lora_pipe.cuh) is taken for fp16/bf16 with r <= 64 and
    16-byte aligned rows (unit inner stride; K, N, row strides multiples of 8); anything else runs the simple
    kernels and the reason is reported here, never silently.
    """
    return dict(_require_native().last_path())


def _dropout_args(opts: LoRAOpts) -> dict:
    p = opts.dropout_p
    if p > 0:
        return dict(
            dropout=True, seed=opts.seed, offset=opts.offset, threshold=_rng.keep_threshold(p), inv_keep=1.0 / (1.0 - p)
        )
    return dict(dropout=False, seed=0, offset=0, threshold=0, inv_keep=1.0)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class _CudaLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, opts: LoRAOpts):
        C = _require_native()
        k = x.shape[-1]
        n, r = weight.shape[0], lora_A.shape[0]
        x2 = x.reshape(-1, k)  # a view whenever the leading dims flatten; strides go to the kernel
        m = x2.shape[0]
        weight_c, a_c, b_c = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
        bias_c = bias.contiguous() if bias is not None else None
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        xa = torch.empty(m, r, dtype=torch.float32, device=x.device)
        C.lora_fwd(
            x=_ptr(x2),
            stride_x_m=x2.stride(0),
            stride_x_k=x2.stride(1),
            weight=_ptr(weight_c),
            bias=_ptr(bias_c),
            lora_a=_ptr(a_c),
            lora_b=_ptr(b_c),
            y=_ptr(y),
            xa=_ptr(xa),
            M=m,
            N=n,
            K=k,
            r=r,
            act_dtype=_DTYPE_CODES[x.dtype],
            adapter_dtype=_DTYPE_CODES[lora_A.dtype],
            scale=opts.scale,
            **_dropout_args(opts),
            device=x.device.index,
            stream=torch.cuda.current_stream(x.device).cuda_stream,
        )
        ctx.opts = opts
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, weight_c, a_c, b_c, xa)
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y):
        C = _require_native()
        x2, weight, lora_A, lora_B, xa = ctx.saved_tensors
        opts: LoRAOpts = ctx.opts
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        m, k = x2.shape
        n, r = weight.shape[0], lora_A.shape[0]
        g = grad_y.reshape(-1, n)  # may be strided (even stride 0 for an expanded grad): the kernel takes strides
        if g.dtype != x2.dtype:
            g = g.to(x2.dtype)
        dev = x2.device
        dx = torch.empty(m, k, dtype=x2.dtype, device=dev) if need_x else None
        d_a = torch.empty_like(lora_A)
        d_b = torch.empty_like(lora_B)
        d_bias = torch.empty(n, dtype=x2.dtype, device=dev) if (need_b and ctx.has_bias) else None
        ws_bytes = C.bwd_workspace_bytes(m, n, k, r, opts.deterministic)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
        C.lora_bwd(
            grad_y=_ptr(g),
            stride_g_m=g.stride(0),
            stride_g_n=g.stride(1),
            x=_ptr(x2),
            stride_x_m=x2.stride(0),
            stride_x_k=x2.stride(1),
            weight=_ptr(weight),
            lora_a=_ptr(lora_A),
            lora_b=_ptr(lora_B),
            xa=_ptr(xa),
            grad_x=_ptr(dx),
            grad_a=_ptr(d_a),
            grad_b=_ptr(d_b),
            grad_bias=_ptr(d_bias),
            workspace=_ptr(ws),
            workspace_bytes=ws_bytes,
            M=m,
            N=n,
            K=k,
            r=r,
            act_dtype=_DTYPE_CODES[x2.dtype],
            adapter_dtype=_DTYPE_CODES[lora_A.dtype],
            scale=opts.scale,
            **_dropout_args(opts),
            deterministic=opts.deterministic,
            device=dev.index,
            stream=torch.cuda.current_stream(dev).cuda_stream,
        )
        # dW = Gᵀ X only for a trainable base weight (full fine-tuning): one cuBLAS GEMM, outside the fused kernel.
        dw = (g.t() @ x2).to(weight.dtype) if need_w else None
        dx = dx.view(ctx.x_shape) if dx is not None else None
        # dA and dB come out of the kernel together; hand autograd only what it asked for
        return dx, dw, d_bias, d_a if need_a else None, d_b if need_bb else None, None


def apply(x, weight, bias, lora_A, lora_B, lora_R, opts: LoRAOpts) -> torch.Tensor:
    if lora_R is not None:  # resolve() checks supports() first; this guards direct calls
        raise ValueError("the cuda backend does not implement lora_R; use backend 'torch' or 'triton'")
    return _CudaLoRALinear.apply(x, weight, bias, lora_A, lora_B, opts)
