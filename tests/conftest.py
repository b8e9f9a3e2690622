"""Shared test setup.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, so it is set here, at collection
time, whenever no CUDA device is present: the Triton kernels then run under the interpreter on CPU tensors.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _hermetic_cwd(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh empty working directory: nothing reads or writes the caller's (e.g. the ``runs/``
    of a README run in the repository). Tests that need repository files name them through ``ROOT``."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def _reset_backend():
    import lora_kernels

    lora_kernels.set_backend(None)
    yield
    lora_kernels.set_backend(None)
