"""Multi-process training on ``torch.distributed``, launched by ``torchrun``. No communication code of our own.

    torchrun --nproc_per_node 2 -m lora_kernels.cli sft --distributed ddp ...

- :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR/PORT``) and starts the default process group: ``nccl`` with one GPU per process, ``gloo`` on CPU.
  Without torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) it does nothing and every helper below degrades to
  the single-process answer, so the training loop has one code path.
- :func:`wrap_model`: ``"ddp"`` = ``DistributedDataParallel`` (replicated weights, gradients all-reduced:
  only parameters with ``requires_grad`` are synchronised, i.e. the LoRA weights); ``"fsdp"`` = FSDP2
  (``torch.distributed.fsdp.fully_shard`` per decoder layer, then the root: parameters, gradients and
  optimizer state sharded across ranks, for models that do not fit one device).
- Data: every step consumes one *global* batch; rank ``r`` takes the ``r``-th contiguous slice
  (:func:`shard_slice`). With the loss divided by the *global* number of target tokens times the world size
  (:func:`global_num_items`), DDP's gradient averaging gives exactly the gradient of the single-process run on
  the whole global batch; the logged loss is the all-reduced sum over the all-reduced count.
- Checkpoints: the trainable state is the same on every DDP rank, so rank 0 writes (:func:`is_main_process`,
  :func:`barrier` around it); :func:`full_state_dicts` gathers full (unsharded) model/optimizer state for FSDP2
  too, so a checkpoint can be resumed with a different world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(backend: str | None = None, *, device: str | None = None, timeout_s: float = 1800) -> DistInfo:
    """Start the process group from torchrun's environment; a no-op for a single process.

    Args:
        backend: ``"gloo"`` / ``"nccl"``; default ``nccl`` when CUDA is available (and ``device`` is not
            ``"cpu"``), else ``gloo``.
        device: ``"cpu"`` or ``"cuda"``; default CUDA when available. On CUDA each process uses GPU
            ``LOCAL_RANK``.
        timeout_s: collective timeout.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch.cuda.is_available() is False")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world <= 1:
        return DistInfo(0, 1, 0, None, dev if not use_cuda else torch.device("cuda", 0))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not use_cuda:
        raise ValueError("backend='nccl' needs CUDA devices; use 'gloo' on CPU")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, dev)


def teardown() -> None:
    """Destroy the process group (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """Whether this process is one of several torchrun workers (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def exit_worker(code: int) -> None:
    """End a torchrun worker with ``code``, skipping the interpreter's finalization (``os._exit``).

    Why: with torch 2.13's gloo backend, 2-process workers that had finished, called
    ``destroy_process_group`` and written every result still died of SIGABRT ("terminate called without an
    active exception") while the interpreter shut down, in 9 of 60 runs of ``tests/test_distributed.py``'s
    worker on the 2-core CI machine, so torchrun reported a finished run as failed; with this exit, 0 of 80.
    Everything a run writes is closed (checkpoints and adapters fsync'ed, metrics closed) before its caller gets
    here; stdout, stderr and the logging handlers are flushed first."""
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Data and metrics


def shard_slice(global_batch: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """The rows of a global batch that belong to ``rank``: a contiguous, equal-sized block.

    Contiguous blocks (not ``rank::world``) keep a packed or length-sorted global batch in order, and make the
    concatenation of the rank shards equal to the global batch, which the single-process equivalence needs.
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world_size is None else world_size
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world_size={world}), got {rank}")
    if global_batch < 1 or global_batch % world:
        raise ValueError(f"global_batch ({global_batch}) must be a positive multiple of the world size ({world})")
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)


def _device_for_collectives() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: float | int | torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks, as a (detached) fp64 tensor on the collective's device (CPU for gloo)."""
    t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
    t = t.to(_device_for_collectives()).clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_num_items(local_items: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global_count, divisor)`` for the loss of a data-parallel step.

    ``global_count`` is the number of target tokens in the whole global batch (all ranks, all micro-batches
    when ``local_items`` already counts them); ``divisor = global_count / world_size`` is what each rank passes
    as ``num_items_in_batch``: ``loss_r = sum_r / divisor``, and DDP's mean over ranks of ``∇loss_r`` is then
    ``∇(Σ_r sum_r) / global_count``, the single-process gradient.
    """
    total = all_reduce_sum(local_items)
    return total, total / get_world_size()


def reduce_metrics(metrics: Mapping[str, float | int | torch.Tensor], op: str = "mean") -> dict[str, float]:
    """All-reduce a dict of scalars in one collective; ``op`` = ``"mean"`` | ``"sum"`` | ``"max"`` | ``"min"``."""
    if op not in ("mean", "sum", "max", "min"):
        raise ValueError(f"op must be 'mean', 'sum', 'max' or 'min', got {op!r}")
    keys = sorted(metrics)
    vals = [float(metrics[k].detach().item() if isinstance(metrics[k], torch.Tensor) else metrics[k]) for k in keys]
    if not keys:
        return {}
    t = torch.tensor(vals, dtype=torch.float64, device=_device_for_collectives())
    if is_distributed():
        rop = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=rop[op])
        if op == "mean":
            t /= get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (downloads, caches, dataset preprocessing), the others after it."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


# ----------------------------------------------------------------------------------------------------------------
# Models


def _decoder_layers(model: nn.Module):
    from ..models.registry import blocks_of

    return blocks_of(model)


def wrap_model(
    model: nn.Module,
    strategy: str = "ddp",
    *,
    device: torch.device | None = None,
    mixed_precision: torch.dtype | None = None,
    layers=None,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Wrap ``model`` for data-parallel training. ``strategy``: ``"none"`` | ``"ddp"`` | ``"fsdp"``.

    - ``ddp``: ``DistributedDataParallel`` (``device_ids=[device]`` on CUDA). Trainable parameters must be
      identical on all ranks: build the model from the same seed, or load the same weights.
    - ``fsdp``: FSDP2 in place (``fully_shard`` on each module of ``layers``, default the decoder layers, then
      on the root); returns the same object. ``mixed_precision`` sets FSDP's compute dtype (``param_dtype``,
      gradients reduced in fp32); it is required when parameter dtypes are mixed (bf16 frozen base + fp32
      LoRA), because FSDP2 all-gathers one dtype per group.
    - ``none``, or a single process: the model, unchanged.

    Gradient checkpointing (non-reentrant) and :func:`lora_kernels.training.losses.enable_chunked_loss` are applied before
    wrapping. Build the optimizer **after** wrapping: FSDP2 replaces each parameter by a sharded ``DTensor``
    parameter, and an optimizer holding the old ones silently trains nothing that the forward uses.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none":
        return model
    if not is_distributed():
        return model  # a single process: nothing to synchronise (launch with torchrun for more)
    if device is None:
        device = _device_for_collectives()
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model: DDP needs at least one parameter with requires_grad=True")
        model.to(device)
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1 and mixed_precision is None:
        raise ValueError(
            f"mixed_precision: parameters have several dtypes {sorted(map(str, dtypes))}; FSDP2 needs one compute "
            "dtype (e.g. mixed_precision=torch.bfloat16)"
        )
    mp = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32 if mixed_precision else None)
    mesh = init_device_mesh(device.type, (get_world_size(),))
    model.to(device)
    blocks = list(layers) if layers is not None else list(_decoder_layers(model) or [])
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce on micro-batches before the last of an accumulation step (DDP / FSDP2)."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def _fsdp():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _fsdp()
    return contextlib.nullcontext()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, trainable_only=True):
    """Full (unsharded, CPU) model and optimizer state on rank 0 (empty dicts on the others): what rank 0 writes.

    Uses ``torch.distributed.checkpoint.state_dict`` (works for plain, DDP and FSDP2 models; a collective: call
    it on every rank). Keys are the unwrapped model's; ``trainable_only`` keeps parameters with
    ``requires_grad`` (the adapter). The optimizer state is keyed by parameter name, so it loads back at any
    world size with :func:`load_full_state_dicts`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    msd = get_model_state_dict(model, options=opts)
    if trainable_only:  # ignore_frozen_params still lets a frozen tied alias through (lm_head.weight): filter
        keep = {n for n, p in unwrap_model(model).named_parameters(remove_duplicate=False) if p.requires_grad}
        msd = {k: v for k, v in msd.items() if k in keep}
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_state_dicts(model: nn.Module, optimizer, model_sd, optim_sd=None) -> None:
    """Inverse of :func:`full_state_dicts`: load full state into a (possibly wrapped / sharded) model.

    Under torchrun only rank 0 needs the dicts (read from disk); it broadcasts them (the others may pass ``{}``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=is_distributed())
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
