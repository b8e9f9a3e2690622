"""Build script: pure-Python package, plus the optional CUDA extension (lora_kernels._C) when nvcc is found.

The native build never breaks install: no nvcc, or LORA_KERNELS_SKIP_CUDA=1, prints one line and installs the
Python package alone. See csrc/README.md for the extension's build options.
"""

from setuptools import setup

setup()
