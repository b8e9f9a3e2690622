"""bitsandbytes' 4-bit weights (NF4 and FP4, with or without double quantization) as the frozen base of the op.

Format (``bitsandbytes.functional.quantize_4bit``), for a weight ``W [N, K]`` flattened row-major to ``e = n*K + k``::

    code(e)   = (packed[e // 2] >> 4) & 0xF  if e is even  else  packed[e // 2] & 0xF     (two codes per byte)
    W[e]      = table[code(e)] * absmax[e // blocksize]          fp32 product, then one cast to the output dtype
    table     = quant_state.code (16 values: the NF4 quantiles or the FP4 grid, in [-1, 1])
    absmax    = quant_state.absmax (fp32), or with double quantization ("nested"):
    absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b // nested_blocksize] + offset          (fp32)

Blocks run over the flat index, so one block may span two rows when ``K`` is not a multiple of the blocksize,
and one byte may hold the last code of a row and the first of the next when ``K`` is odd; every function here
works on flat indices and so takes any shape and any blocksize bitsandbytes allows.

:func:`describe` turns a ``bitsandbytes.nn.Params4bit`` into a :class:`QuantWeight4bit`: an immutable view of the
same storage (the packed codes are never copied, never dequantized into a stored full-precision tensor). The op
(:func:`lora_kernels.functional.lora_linear`) accepts a ``Params4bit`` as ``weight`` and hands backends this
description. :func:`dequantize_rows` is the torch dequantization, bit-identical to
``bitsandbytes.functional.dequantize_4bit``, for a range of rows at a time (the torch backend's chunks).

This module never imports bitsandbytes: a ``Params4bit`` can only exist once bitsandbytes is imported, so the
check looks in ``sys.modules``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit accepts
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what bitsandbytes dequantizes to
CHUNK_ENV = "LORA_KERNELS_DEQUANT_CHUNK"
# Elements of W dequantized at once by the torch path: 4M elements = 16 MiB of fp32 plus ~4 bytes per element of
# transient codes; a whole layer of a small model (SmolLM2-135M: 0.9M) is one chunk.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def is_params4bit(t) -> bool:
    """Whether ``t`` is a ``bitsandbytes.nn.Params4bit`` (False, without importing it, when bitsandbytes is not
    imported: no such object can exist then)."""
    bnb = sys.modules.get("bitsandbytes")
    nn_mod = getattr(bnb, "nn", None) if bnb is not None else None
    cls = getattr(nn_mod, "Params4bit", None)
    return cls is not None and isinstance(t, cls)


def is_4bit(weight) -> bool:
    """Whether ``weight`` is a 4-bit base: a :class:`QuantWeight4bit` or a ``Params4bit``."""
    return isinstance(weight, QuantWeight4bit) or is_params4bit(weight)


@dataclass(frozen=True, eq=False)
class QuantWeight4bit:
    """A bitsandbytes 4-bit weight ``[N, K]``, described without copying (module docstring has the format).

    ``packed`` is a flat uint8 view of the ``Params4bit`` storage, ``absmax`` the per-block scales (fp32, or the
    uint8 codes of the nested quantization), ``dequant_dtype`` the dtype bitsandbytes dequantizes to by default
    (``quant_state.dtype``: the dtype the weight had before quantization). ``source`` is the Parameter itself.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    quant_type: str
    shape: tuple[int, int]
    dequant_dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 0
    offset: torch.Tensor | None = None
    source: object = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def nbytes(self, seen: set | None = None) -> int:
        """Bytes held by the weight: packed codes + scales (+ the nested scales and table) + the 16-entry table.
        ``seen``: data pointers already counted (bitsandbytes shares the tables between layers), updated."""
        seen = set() if seen is None else seen
        total = 0
        for t in (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def __repr__(self) -> str:
        nested = f", nested (blocksize {self.nested_blocksize})" if self.nested else ""
        return (
            f"QuantWeight4bit({self.quant_type}, shape={self.shape}, blocksize={self.blocksize}{nested}, "
            f"dequant_dtype={self.dequant_dtype}, device={self.device})"
        )


def _fail(argname: str, why: str):
    raise ValueError(f"{argname} is a bitsandbytes 4-bit weight that lora_kernels cannot use: {why}")


def _check_state(qs, data: torch.Tensor, argname: str) -> tuple[int, int]:
    if qs is None:
        _fail(argname, "it is not quantized yet (quant_state is None); move its Linear4bit to a device first")
    if getattr(qs, "packing_format_for_cpu", False):
        _fail(argname, "it is in bitsandbytes' CPU inference layout; wrap the layer with LoRALinear.from_linear / "
                       "apply_lora, which restores the standard layout")  # fmt: skip
    if qs.quant_type not in QUANT_TYPES:
        _fail(argname, f"quant_type must be one of {QUANT_TYPES}, got {qs.quant_type!r}")
    if qs.blocksize not in BLOCKSIZES:
        _fail(argname, f"blocksize must be one of {BLOCKSIZES}, got {qs.blocksize!r}")
    if qs.shape is None or len(qs.shape) != 2:
        _fail(argname, f"quant_state.shape must be 2-D [out_features, in_features], got {qs.shape}")
    n, k = (int(s) for s in qs.shape)
    if data.numel() * data.element_size() != (n * k + 1) // 2 or not data.is_contiguous():
        _fail(argname, f"its data holds {data.numel() * data.element_size()} bytes, expected {(n * k + 1) // 2} "
                       f"contiguous bytes for a {n} x {k} weight")  # fmt: skip
    blocks = -(-n * k // qs.blocksize)
    if qs.absmax.numel() != blocks:
        _fail(argname, f"quant_state.absmax has {qs.absmax.numel()} scales, expected {blocks}")
    if qs.code is None or qs.code.numel() != 16:
        _fail(argname, "quant_state.code must hold the 16 values of the 4-bit type")
    if qs.dtype not in COMPUTE_DTYPES:
        _fail(argname, f"quant_state.dtype must be one of {COMPUTE_DTYPES}, got {qs.dtype}")
    return n, k


def describe(weight, argname: str = "weight") -> QuantWeight4bit:
    """The :class:`QuantWeight4bit` of a ``Params4bit`` (or ``weight`` itself when it is one already).

    Raises ``ValueError`` naming ``argname`` when the weight is not quantized, in bitsandbytes' CPU inference
    layout, or inconsistent with its quant state."""
    if isinstance(weight, QuantWeight4bit):
        return weight
    if not is_params4bit(weight):
        raise TypeError(f"{argname} must be a bitsandbytes Params4bit, got {type(weight).__name__}")
    qs = weight.quant_state
    data = weight.data
    n, k = _check_state(qs, data, argname)
    nested = dict()
    if qs.nested:
        nested = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                      nested_blocksize=int(qs.state2.blocksize), offset=qs.offset)  # fmt: skip
    return QuantWeight4bit(
        packed=data.view(torch.uint8).view(-1),
        absmax=qs.absmax,
        code=qs.code,
        blocksize=int(qs.blocksize),
        quant_type=qs.quant_type,
        shape=(n, k),
        dequant_dtype=qs.dtype,
        source=weight,
        **nested,
    )


def as_op_weight(weight):
    """What the op hands its backends for ``weight``: the description of a ``Params4bit``, else ``weight``."""
    return describe(weight) if is_params4bit(weight) else weight


def base_dtype(weight) -> torch.dtype:
    """The floating dtype a base weight stands for: ``quant_state.dtype`` for a 4-bit weight, else its dtype."""
    if is_4bit(weight):
        return describe(weight).dequant_dtype
    return weight.dtype


def absmax_fp32(q: QuantWeight4bit) -> torch.Tensor:
    """The per-block scales in fp32 (dequantizing the nested scales, bit-identical to bitsandbytes), per call:
    ``N*K / blocksize`` values, 1/16 of the weight's element count at blocksize 64."""
    if not q.nested:
        return q.absmax if q.absmax.dtype == torch.float32 else q.absmax.float()
    bs = q.nested_blocksize
    vals = q.nested_code.float()[q.absmax.view(-1).long()]
    nb = -(-vals.numel() // bs)
    pad = nb * bs - vals.numel()
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    vals = (vals.view(nb, bs) * q.nested_absmax.float().view(nb, 1)).view(-1)[: q.absmax.numel()]
    return vals + q.offset.to(vals.device, torch.float32)


def dequantize_rows(q: QuantWeight4bit, start: int, stop: int, dtype: torch.dtype | None = None,
                    absmax: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Rows ``[start, stop)`` of W as a ``[stop - start, K]`` tensor in ``dtype`` (default ``q.dequant_dtype``),
    bit-identical to the same rows of ``bitsandbytes.functional.dequantize_4bit(...).to(dtype)`` when dtype is the
    quant state's dtype, and to bitsandbytes' ``dequantize_4bit`` op asked for ``dtype`` otherwise (fp32 product,
    one cast). ``absmax``: :func:`absmax_fp32` when the caller has it already. Transient memory: ~10 bytes per
    element of the range, plus two blocks."""
    n, k = q.shape
    if not (0 <= start <= stop <= n):
        raise ValueError(f"rows [{start}, {stop}) out of range for a weight with {n} rows")
    dtype = dtype or q.dequant_dtype
    if start == stop or k == 0:
        return torch.empty((stop - start, k), dtype=dtype, device=q.device)
    absmax = absmax_fp32(q) if absmax is None else absmax
    bs = q.blocksize
    e0, e1 = start * k, stop * k
    b0, b1 = e0 // bs, -(-e1 // bs)  # the blocks the rows touch
    s0, s1 = b0 * bs, min(b1 * bs, n * k)  # their elements (s0 is even: every blocksize is)
    byte = q.packed[s0 // 2 : (s1 + 1) // 2]
    codes = torch.stack((byte >> 4, byte & 0xF), dim=1).view(-1)[: s1 - s0]
    vals = q.code.float()[codes.int()]
    pad = (b1 - b0) * bs - (s1 - s0)
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    vals = (vals.view(b1 - b0, bs) * absmax[b0:b1].view(-1, 1)).view(-1)
    return vals[e0 - s0 : e1 - s0].view(stop - start, k).to(dtype)


def dequantize(q, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole weight ``[N, K]`` (a ``Params4bit`` or its description): for merges, exports and tests, not the
    training path (which works in chunks)."""
    q = describe(q)
    return dequantize_rows(q, 0, q.shape[0], dtype)


def chunk_rows(q: QuantWeight4bit) -> int:
    """Rows of W per torch-path chunk: ``LORA_KERNELS_DEQUANT_CHUNK`` elements (default 4M) per chunk, >= 1 row."""
    raw = os.environ.get(CHUNK_ENV)
    elems = DEFAULT_CHUNK_ELEMENTS
    if raw:
        try:
            elems = int(raw)
        except ValueError:
            elems = 0
        if elems < 1:
            raise ValueError(f"environment variable {CHUNK_ENV} must be a positive element count, got {raw!r}")
    return max(1, min(q.shape[0], elems // max(1, q.shape[1])))


def check_op_weight(weight: QuantWeight4bit, x: torch.Tensor) -> None:
    """The op's checks for a 4-bit ``weight`` (lora_kernels.functional.validate): activations in a dtype
    bitsandbytes dequantizes to, on the weight's device."""
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 with a 4-bit (bitsandbytes) weight, got {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on the same device as x ({x.device}), got {weight.device}")
