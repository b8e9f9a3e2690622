"""Benchmarks of the fused LoRA linear against the base layer, PEFT and the unfused ``addmm`` composition.

Run from the repository root: ``python -m benchmarks.bench_lora --help`` (see benchmarks/README.md).
"""
