"""Presets of ``benchmarks/bench_lora.py``: the cases, modes, providers and round counts of each named run.

A preset gives either ``M`` x ``shapes`` x ``r`` (every combination) or ``cases`` (explicit ``(M, K, N, r)``
tuples), plus ``dtype`` and ``dropout`` lists; the command-line options override any of them.
"""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd+bwd", "memory")
LLAMA8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
LLAMA70B = [(8192, 28672)]

PRESETS = {
    "cpu-headline": dict(
        device="cpu", M=[2048], shapes=[(4096, 4096)], r=[16], dtype=["fp32"], dropout=[0.0],
        modes=["fwd+bwd", "memory"], min_rounds=11, max_rounds=25, target_s=150.0,
        csv="cpu_headline.csv", md="cpu_headline.md", plot=None,
    ),
    # Issue 15: LoRALinear ("layer") and the torch backend vs PEFT's layer, with and without dropout, at a host-bound
    # shape, a SmolLM2 MLP layer and a large one (explicit cases: each shape has its own rank). Samples of the
    # small cases repeat the call until they last min_sample_ms (grads reset per call) so timer noise stays small.
    "cpu-peft": dict(
        device="cpu", cases=[(4, 64, 64, 8), (512, 576, 1536, 16), (2048, 4096, 4096, 16)], dtype=["fp32"],
        dropout=[0.0, 0.1], providers=["base", "peft", "addmm", "layer", "torch"], modes=["fwd+bwd"], threads=2,
        min_rounds=9, max_rounds=41, target_s=60.0, min_sample_ms=5.0,
        csv="cpu_peft.csv", md="cpu_peft.md", plot=None,
    ),
    "cpu-broad": dict(
        device="cpu", M=[1, 16, 128, 512], shapes=[(4096, 4096), (4096, 1024)], r=[16], dtype=["fp32"],
        dropout=[0.0, 0.1], modes=list(MODES), min_rounds=3, max_rounds=15, target_s=4.0,
        csv="cpu.csv", md="cpu_table.md", plot="cpu_fwdbwd.png",
    ),
    "gpu-headline": dict(
        device="cuda", M=[16, 8192], shapes=[(4096, 4096)], r=[16], dtype=["bf16"], dropout=[0.0, 0.1],
        modes=list(MODES), csv="gpu_headline.csv", md="gpu_headline.md", plot="gpu_headline_fwdbwd.png",
    ),
    "gpu-full": dict(
        device="cuda", M=[1, 16, 128, 2048, 8192, 16384], shapes=LLAMA8B + LLAMA70B, r=[8, 16, 64],
        dtype=["bf16", "fp16"], dropout=[0.0, 0.1], modes=list(MODES),
        csv="gpu_full.csv", md="gpu_full.md", plot="gpu_full_fwdbwd.png",
    ),
    "dry-run": dict(
        device="cpu", M=[16, 33], shapes=[(64, 48)], r=[8], dtype=["bf16"], dropout=[0.0, 0.1],
        modes=list(MODES), min_rounds=2, max_rounds=2, target_s=0.0, allow_interpreter=True,
        csv="dry_run.csv", md="dry_run.md", plot="dry_run_fwdbwd.png",
    ),
}  # fmt: skip
