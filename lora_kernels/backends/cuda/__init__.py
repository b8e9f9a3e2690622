"""The ``cuda`` backend: fused LoRA kernels in CUDA C++ (``csrc/``), bound torch-free as ``lora_kernels._C``.

Importing this package is cheap: the native module is loaded on first use by ``backend``.
"""
