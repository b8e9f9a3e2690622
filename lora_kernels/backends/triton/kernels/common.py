"""Small ``@triton.jit`` helpers shared by the forward and backward kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even everywhere.

    The GPU rounds fp32 -> bf16 to nearest even; the interpreter truncates (and its explicit "rtne" mode drops
    the mantissa carry into the exponent: 1.99 -> 1.0). So under the interpreter round in integer arithmetic
    first (the classic `bits + 0x7FFF + lsb` trick; NaN/inf do not occur in these tensors), which makes the CPU
    tests see the GPU's rounding error, not 2x of it.
    """
    if INTERPRET and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    INTERPRET: the interpreter multiplies bf16 operands as raw uint16 bits (and fp16 in fp16), so upcast both
    operands to the accumulator's dtype there; on the GPU the operands stay in the activation dtype (tensor
    cores; fp64 operands use fp64 MMA).
    IEEE: fp32 activations use exact fp32 products, matching torch's default (allow_tf32=False) so the
    tolerance rule "<= 2x torch's error" holds; tf32 (10-bit mantissa) would put ~2**13 = 8192x fp32's rounding
    error into every product. Not timed on a GPU yet (NOTES.md).
    """
    if INTERPRET:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, out_dtype=acc.dtype)
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, out_dtype=acc.dtype)


@triton.jit
def tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering (Triton tutorial 03): GROUP_M row-tiles share the column tiles of W in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def row_offsets(rows, SEQ, stride_b, stride_m):
    """Element offset of global row ``m = b*SEQ + i`` of a tensor whose leading dims collapse to (b, i)."""
    rows = rows.to(tl.int64)
    return (rows // SEQ) * stride_b + (rows % SEQ) * stride_m
