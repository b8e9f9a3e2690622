"""Fused LoRA kernels in Triton: forward in one launch, backward in one launch (two when deterministic).

Layers: ``forward.py`` / ``backward.py`` (the ``@triton.jit`` kernels, tiling explained in their docstrings),
``_rng.py`` (the dropout hash, bit-exact with lora_kernels.backends.mask), ``configs.py`` (tiles per GPU and shape),
``launch.py`` (launchers and launch counting), ``ops.py`` (torch.library custom ops + autograd), ``backend.py``
(the registry's ``supports``/``apply``). Importing this package imports triton; ``import lora_kernels`` does not.
"""

from .launch import LaunchCounter, forward_plan, get_forward_plan, launch_counter, set_forward_plan

__all__ = ["LaunchCounter", "forward_plan", "get_forward_plan", "launch_counter", "set_forward_plan"]
