"""The Triton kernels compile for real GPUs (sm_90, sm_80) on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler, so a construct that only the GPU compiler
rejects (a dtype mismatch in tl.dot, an invalid atomic, a non-constexpr branch the pipeliner chokes on) would
pass the CPU suite and fail on the GPU. ``triton.compile`` with an explicit ``GPUTarget`` runs the whole
pipeline to a cubin (ptxas ships in the triton wheel) without a device. It runs in a subprocess because
TRITON_INTERPRET=1 (set by conftest.py on CPU machines) replaces the compiler in this process. Only the
variants with every flag on are compiled here (11-27 s per capability on this 2-core machine); the GPU tests
compile the rest.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest
from helpers import HAS_TRITON


def _ptxas() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(HAS_TRITON and _ptxas() is None, reason="this triton wheel ships no ptxas"),
]


# What the JIT specialises at a real launch: unit strides become constants (contiguous tiles -> 16-byte
# cp.async/TMA loads the pipeliner can multi-buffer) and pointers, sizes and strides divisible by 16 are marked so.
UNIT_STRIDES = dict(
    stride_x_k=1, stride_w_k=1, stride_a_k=1, stride_b_r=1, stride_y_n=1, stride_g_n=1, stride_dx_k=1, stride_x_b=0
)


def compile_for(kernel, pointer_types: dict, constexprs: dict, capability: int, num_warps: int, num_stages: int):
    """Compile ``kernel`` to a cubin for ``sm_<capability>``, specialised like a launch on contiguous tensors
    whose sizes are multiples of 16; scalar args are typed as the launchers pass them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {**{k: v for k, v in UNIT_STRIDES.items() if k in names}, **constexprs}
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name == "drop_offset" else "i32"
            if name.startswith("stride") or name in ("M", "N", "K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def _compile_all(capability: int) -> dict:
    from lora_kernels.backends.triton.kernels.backward import lora_bwd_kernel
    from lora_kernels.backends.triton.kernels.gemm import lora_fwd_kernel

    act = {n: "*bf16" for n in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "g_ptr", "dx_ptr")}
    f32 = {
        n: "*fp32" for n in ("a_ptr", "b_ptr", "rm_ptr", "xa_ptr", "gb_ptr", "da_ptr", "db_ptr", "dbias_ptr", "drm_ptr")
    }
    common = dict(HAS_DROPOUT=True, HAS_R=True, R_PAD=16, IEEE=False, INTERPRET=False, GROUP_M=8)
    fwd = compile_for(
        lora_fwd_kernel, {**act, **f32}, dict(common, HAS_BIAS=True, FUSE_XA=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
        capability, 8, 3,
    )  # fmt: skip
    bwd = compile_for(
        lora_bwd_kernel, {**act, **f32},
        dict(common, NEED_DX=True, NEED_DA=True, NEED_DB=True, NEED_DBIAS=True, NEED_DR=True, DETERMINISTIC=False,
             PRE_GW=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128),
        capability, 8, 3,
    )  # fmt: skip
    return {"fwd_shared": fwd.metadata.shared, "bwd_shared": bwd.metadata.shared}


def _compiled(call: str) -> dict:
    """Run ``t.<call>`` of this module in a fresh interpreter without TRITON_INTERPRET (the real compiler) and
    return the JSON it prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import json, sys; sys.path.insert(0, 'tests'); import test_triton_compile as t; print(json.dumps(t.{call}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("capability", [90, 80], ids=["sm90", "sm80"])
def test_kernels_compile_for_gpu(capability):
    info = _compiled(f"_compile_all({capability})")
    # One pipeline stage: fwd x [128, 64] + w [64, 128] bf16 + A [64, 16] fp32 = 36 KB, bwd g [128, 64] +
    # w [64, 128] bf16 + B [64, 16] fp32 = 36 KB. At least two stages resident = the main loops are multi-buffered
    # (measured: sm90 fwd 106 KB, bwd 110 KB; sm80 fwd 88 KB, bwd 76 KB).
    stage = 36 * 1024
    assert info["fwd_shared"] >= 2 * stage, info
    assert info["bwd_shared"] >= 2 * stage, info


# Shared memory per block (bytes) as Triton's launcher checks it: sm_90 227 KB, sm_89 (RTX 40xx, L4, L40) 99 KB.
MAX_SHARED = {90: 232448, 89: 101376}


def _compile_defaults(capability: int) -> dict:
    """Compile the first (default) tile of every kernel kind as ``configs.candidates`` picks it for a device of
    ``capability`` with ``MAX_SHARED[capability]`` bytes, M=8192, bf16 activations, fp32 adapters, r=16."""
    from lora_kernels.backends.triton import configs
    from lora_kernels.backends.triton.kernels.backward import lora_bwd_kernel
    from lora_kernels.backends.triton.kernels.gemm import lora_fwd_kernel
    from lora_kernels.backends.triton.kernels.xa import lora_xa_kernel

    act = {n: "*bf16" for n in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "g_ptr", "dx_ptr")}
    f32 = {
        n: "*fp32" for n in ("a_ptr", "b_ptr", "rm_ptr", "xa_ptr", "gb_ptr", "da_ptr", "db_ptr", "dbias_ptr", "drm_ptr")
    }
    common = dict(HAS_R=False, R_PAD=16, IEEE=False, INTERPRET=False)
    cap = (capability // 10, capability % 10)
    out = {}
    for kind, mode in (("fwd", 0), ("fwd_gemm", 1), ("fwd_xa", 2), ("bwd", None), ("bwd_epi", None)):
        bm, bn, bk, g, w, s = configs.candidates(kind, 8192, 16, "bfloat16", cap, True, MAX_SHARED[capability])[0]
        tiles = dict(common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g)
        if mode is None:
            flags = dict(NEED_DX=True, NEED_DA=True, NEED_DB=True, NEED_DBIAS=True, NEED_DR=False, DETERMINISTIC=False,
                         PRE_GW=kind == "bwd_epi")  # fmt: skip
            k = compile_for(lora_bwd_kernel, {**act, **f32}, dict(tiles, HAS_DROPOUT=True, **flags), capability, w, s)
        elif mode == 2:  # the xa kernel (XA, GB): no W, no BLOCK_N / GROUP_M
            xa_tiles = dict(R_PAD=16, IEEE=False, INTERPRET=False, BLOCK_M=bm, BLOCK_K=bk)
            ptrs = {"x_ptr": "*bf16", "a_ptr": "*fp32", "out_ptr": "*fp32"}
            k = compile_for(lora_xa_kernel, ptrs, dict(xa_tiles, HAS_DROPOUT=True), capability, w, s)
        else:
            flags = dict(HAS_BIAS=True, HAS_DROPOUT=mode == 0, FUSE_XA=mode == 0)
            k = compile_for(lora_fwd_kernel, {**act, **f32}, dict(tiles, **flags), capability, w, s)
        out[kind] = [k.metadata.shared, [bm, bn, bk, g, w, s]]
    return out


@pytest.mark.parametrize("capability", [90, 89], ids=["sm90", "sm89"])
def test_default_tiles_fit_shared_memory(capability):
    """The default tile of each kernel, as chosen for the device's shared memory, fits it (ptxas's count), so the
    first launch cannot fail with OutOfResources: on sm_89 (99 KB) the sm_90/sm_80 tables' 3-stage tiles would
    not (configs.fit_shared_memory), and sm_90's split-plan GEMM tile (128 x 256, 4 stages) is the largest.
    ``bwd_epi`` is the library plan's backward epilogue (PRE_GW)."""
    info = _compiled(f"_compile_defaults({capability})")
    for kind, (shared, cfg) in info.items():
        assert shared <= MAX_SHARED[capability], (kind, cfg, shared)
        assert cfg[5] >= 2, (kind, cfg)  # still multi-buffered
