"""The ``triton`` backend: fused LoRA kernels in Triton, as plans (``plans/``) over a few kernels (``kernels/``).

Layers: ``kernels/`` (the ``@triton.jit`` kernels, tiling explained in their docstrings: ``gemm.py`` forward GEMM
with the LoRA epilogue, ``xa.py`` the rank-r row reduction, ``backward.py``, ``rng.py`` the dropout hash bit-exact
with lora_kernels.backends.mask, ``common.py``), ``plans/`` (fused, split, library: which launches a direction
takes), ``configs.py`` (tiles per GPU and shape), ``launch.py`` (host helpers and launch counting), ``ops.py`` (the
op contract of lora_kernels.backends.opdef), ``backend.py`` (the registry's ``supports``/``apply``). Importing this
package imports triton; ``import lora_kernels`` does not.
"""

from .launch import LaunchCounter, launch_counter
from .plans import PLAN_NAMES, forward_plan, get_forward_plan, set_forward_plan

__all__ = ["PLAN_NAMES", "LaunchCounter", "forward_plan", "get_forward_plan", "launch_counter", "set_forward_plan"]
