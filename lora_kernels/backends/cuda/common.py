"""What both CUDA plans hand the torch-free bindings: raw pointers, the current stream, the dropout keys."""

from __future__ import annotations

import torch

from .. import mask

try:  # the raw cudaStream_t of the current stream as an int, without building a torch.cuda.Stream object
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - CPU-only builds of torch
    _raw_stream = None


def dropout_args(p: float, seed: int, offset: int) -> dict:
    """The binding's dropout keywords: ``threshold`` (lora_kernels.backends.mask) and ``inv_keep = 1/(1-p)``."""
    if p > 0:
        return dict(dropout=True, seed=seed, offset=offset, threshold=mask.keep_threshold(p), inv_keep=1.0 / (1.0 - p))
    return dict(dropout=False, seed=0, offset=0, threshold=0, inv_keep=1.0)


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream(dev: torch.device) -> int:
    """The current stream of ``dev`` (what torch's own kernels run on; CUDA-graph capture records it)."""
    if _raw_stream is not None:
        return _raw_stream(dev.index if dev.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(dev).cuda_stream
