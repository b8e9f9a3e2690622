"""Plan ``fused`` of the CUDA backend: the one-launch kernels of ``lora_kernels._C`` (csrc/lora_fwd.cu, lora_bwd.cu).

Forward one launch writes ``y`` and ``xa = dropout(x) Aᵀ`` (fp32, saved for backward); backward one launch for
``dx, dA, dB, db`` (fp32 atomics), two without atomics when deterministic (bit-reproducible). The dropout mask is
regenerated in the backward kernel from ``(seed, offset)``, never stored. The kernels write dA/dB in the adapter
dtype and db in the activation dtype; fp32 adapters write straight into the contract's flat fp32 buffer, other
dtypes go through a copy of r·K + N·r elements.
"""

from __future__ import annotations

import torch

from ..opdef import grad_layout
from .common import dropout_args as _dropout_args
from .common import ptr as _ptr
from .common import stream as _stream
from .native import _DTYPE_CODES, _require_native


def forward(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout_p, seed, offset):
    C = _require_native()
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    x2 = x.reshape(-1, k)  # a view whenever the leading dims flatten; strides go to the kernel
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    xa = torch.empty(m, r, dtype=torch.float32, device=x.device)
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    C.lora_fwd(
        x=_ptr(x2), stride_x_m=x2.stride(0), stride_x_k=x2.stride(1), weight=_ptr(weight),
        bias=_ptr(bias.contiguous() if bias is not None else None), lora_a=_ptr(lora_A), lora_b=_ptr(lora_B),
        y=_ptr(y), xa=_ptr(xa), M=m, N=n, K=k, r=r, act_dtype=_DTYPE_CODES[x.dtype],
        adapter_dtype=_DTYPE_CODES[lora_A.dtype], scale=scale, **_dropout_args(dropout_p, seed, offset),
        device=x.device.index, stream=_stream(x.device),
    )  # fmt: skip
    return y.view(*x.shape[:-1], n), xa


def backward(g, x, weight, lora_A, lora_B, lora_R, xa, scale, dropout_p, seed, offset, need_dx, need_da, need_db,
             need_dbias, need_dr, deterministic):  # fmt: skip
    C = _require_native()
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    x2 = x.reshape(-1, k)
    m, dev = x2.shape[0], x.device
    off_da, off_db, off_dbias, _, length = grad_layout(r, k, n, need_da, need_db, need_dbias, False)
    flat = torch.zeros(length, dtype=torch.float32, device=dev)
    dx = torch.empty(x.shape if need_dx else (0,), dtype=x.dtype, device=dev)
    if m == 0:
        return dx, flat
    g2 = g.reshape(-1, n)  # may be strided (even stride 0 for an expanded grad): the kernel takes strides
    if g2.dtype != x.dtype:
        g2 = g2.to(x.dtype)
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    fp32 = lora_A.dtype == torch.float32
    # the kernel writes dA and dB together: into the flat buffer when fp32, else into scratch in their dtype
    d_a = flat[off_da : off_da + r * k] if fp32 and need_da else torch.empty_like(lora_A)
    d_b = flat[off_db : off_db + n * r] if fp32 and need_db else torch.empty_like(lora_B)
    d_bias = torch.empty(n, dtype=x.dtype, device=dev) if need_dbias else None
    ws_bytes = C.bwd_workspace_bytes(m, n, k, r, deterministic)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    C.lora_bwd(
        grad_y=_ptr(g2), stride_g_m=g2.stride(0), stride_g_n=g2.stride(1), x=_ptr(x2), stride_x_m=x2.stride(0),
        stride_x_k=x2.stride(1), weight=_ptr(weight), lora_a=_ptr(lora_A), lora_b=_ptr(lora_B), xa=_ptr(xa),
        grad_x=_ptr(dx) if need_dx else 0, grad_a=_ptr(d_a), grad_b=_ptr(d_b), grad_bias=_ptr(d_bias),
        workspace=_ptr(ws), workspace_bytes=ws_bytes, M=m, N=n, K=k, r=r, act_dtype=_DTYPE_CODES[x.dtype],
        adapter_dtype=_DTYPE_CODES[lora_A.dtype], scale=scale, **_dropout_args(dropout_p, seed, offset),
        deterministic=deterministic, device=dev.index, stream=_stream(dev),
    )  # fmt: skip
    if need_da and not fp32:
        flat[off_da : off_da + r * k].copy_(d_a.view(-1))
    if need_db and not fp32:
        flat[off_db : off_db + n * r].copy_(d_b.view(-1))
    if need_dbias:
        flat[off_dbias : off_dbias + n].copy_(d_bias)
    return dx, flat
