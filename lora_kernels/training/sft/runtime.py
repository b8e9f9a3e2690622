"""Run setup for the SFT loop: device, precision, strategy, seeds, the training method (LoRA or full), the model's
placement (frozen-base dtype, checkpointing, chunked loss, DDP / FSDP2), optimizer groups and the schedule.

:func:`wrap_model` is the only place the model may be wrapped; :func:`is_main_process` decides who writes files.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random

import numpy as np
import torch

from lora_kernels.training import distributed as dist_utils

from .config import QUANT_BASE_DTYPES, ConfigError, SFTConfig


def is_main_process() -> bool:
    return dist_utils.is_main_process()


def resolve_strategy(cfg: SFTConfig) -> str:
    """``none`` | ``ddp`` | ``fsdp``: what ``cfg.distributed`` means for this launch (torchrun sets WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if cfg.distributed in ("auto", "none") or world <= 1:
        return "ddp" if cfg.distributed == "auto" and world > 1 else "none"
    return cfg.distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(cfg: SFTConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available() and dist_utils.is_distributed():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config field 'device': {cfg.device!r} requested but CUDA is not available")
    return dev


def resolve_precision(cfg: SFTConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32)."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type == "cpu"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config field 'precision': bf16 autocast needs a GPU with bf16 support; use fp32")
    return torch.bfloat16


@functools.lru_cache(maxsize=1)
def cpu_bf16_instructions() -> str | None:
    """The CPU feature that runs bf16 matrix products natively (``amx_bf16`` or ``avx512_bf16`` in
    ``/proc/cpuinfo``), or None: without one, oneDNN emulates bf16 and an fp32 base is as fast or faster."""
    if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
        return "amx_bf16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None
    return next((k for k in ("amx_bf16", "avx512_bf16") if k in flags), None)


def resolve_base_dtype(cfg: SFTConfig, device: torch.device) -> tuple[str, str]:
    """``(dtype, why)`` of the frozen base: what ``base_dtype`` resolves to here and the reason, for the setup line.

    ``auto`` is bf16 for LoRA on a GPU and on a CPU with bf16 instructions (the base's matrix products are most of
    a step; adapters and optimizer state stay fp32), fp32 elsewhere and for full fine-tuning.
    """
    if cfg.base_dtype != "auto":
        return cfg.base_dtype, "set by base_dtype"
    if cfg.method != "lora":
        return "fp32", "auto: method full trains every weight"
    if device.type == "cuda":
        return "bf16", "auto: LoRA on a GPU"
    if device.type == "cpu":
        if cfg.modules_to_save and resolve_precision(cfg, device) is None:
            # fp32 trainable copies next to a bf16 base need bf16 autocast to meet one dtype
            return "fp32", "auto: modules_to_save trains fp32 modules without autocast (--precision bf16 allows bf16)"
        flag = cpu_bf16_instructions()
        if flag:
            return "bf16", f"auto: the CPU has {flag}"
        return "fp32", "auto: the CPU has no avx512_bf16 / amx_bf16"
    return "fp32", f"auto: device {device.type}"


def resolve_quant_compute(cfg: SFTConfig, device: torch.device) -> tuple[str, str]:
    """``(dtype, why)`` the rest of a 4-bit base (embeddings, norms, LM head) and so the activations and the
    dequantized tiles run in: bf16 (QLoRA's usual compute dtype) on a GPU and on a CPU with bf16 instructions, fp32
    elsewhere or when ``modules_to_save`` trains fp32 modules without autocast (``--base_dtype`` fp32 for reference)."""
    if device.type == "cpu" and cfg.modules_to_save and resolve_precision(cfg, device) is None:
        return "fp32", "modules_to_save trains fp32 modules without autocast"
    if device.type == "cuda":
        return "bf16", "on a GPU"
    flag = cpu_bf16_instructions() if device.type == "cpu" else None
    return ("bf16", f"the CPU has {flag}") if flag else ("fp32", f"no bf16 instructions on {device.type}")


def low_precision_base(cfg: SFTConfig, device: torch.device) -> bool:
    """Whether the frozen floating weights are stored in bf16: a bf16 base, or the unquantized rest of a 4-bit one."""
    base = resolve_base_dtype(cfg, device)[0]
    return base == "bf16" or (base in QUANT_BASE_DTYPES and resolve_quant_compute(cfg, device)[0] == "bf16")


def load_dtype(cfg: SFTConfig, device: torch.device) -> torch.dtype:
    """The dtype to load the model in: bf16 straight away when the frozen base will be bf16 and nothing but LoRA
    trains (no fp32 copy of the weights is ever held: a lower peak RSS), else fp32 (cast after injection)."""
    bf16 = resolve_base_dtype(cfg, device)[0] == "bf16" and cfg.method == "lora" and not cfg.modules_to_save
    return torch.bfloat16 if bf16 else torch.float32


def resolve_chunked_ce(cfg: SFTConfig, device: torch.device, model=None) -> tuple[bool, str]:
    """``(on, why)`` for the chunked LM-head loss. ``None`` (auto) turns it on on a CPU, where it is faster and
    leaner than full-vocabulary logits (benchmarks/results/sft_vs_hf_pairings_cpu_*.md), when the model's head
    allows it."""
    if cfg.chunked_ce is not None:
        return cfg.chunked_ce, "set by chunked_ce"
    if device.type != "cpu":
        return False, f"auto: off on {device.type} (not measured faster there; --chunked_ce turns it on)"
    if model is not None:
        from lora_kernels.training.losses import chunked_loss_unsupported

        why = chunked_loss_unsupported(model)
        if why:
            return False, f"auto: off, the model's head does not allow it ({why})"
    return True, "auto: on on CPU"


def resolve_fused_blocks(cfg: SFTConfig, device: torch.device) -> tuple[bool, str]:
    """``(on, why)`` for the fused CPU decoder-block ops (lora_kernels.models.fused_blocks: RMSNorm, SiLU-mul).
    ``None`` (auto) turns them on on a CPU when ``lora_kernels._cpu`` has them; ``True`` where they cannot run is
    a ConfigError naming why."""
    from lora_kernels.models.fused_blocks import unavailable

    if cfg.fused_blocks is False:
        return False, "set by fused_blocks"
    why = f"device {device.type} (CPU kernels)" if device.type != "cpu" else unavailable()
    if cfg.fused_blocks:
        if why:
            raise ConfigError(f"config field 'fused_blocks': true cannot run here: {why}")
        return True, "set by fused_blocks"
    return (False, f"auto: off, {why}") if why else (True, "auto: on on CPU")


def backend_label(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    from lora_kernels.backends.registry import backend_info

    info = backend_info()
    ok = [b for b in info["auto_preference"].get(device.type, []) if info["backends"].get(b, {}).get("available")]
    return f"auto -> {ok[0] if ok else 'none available'} on {device.type}"


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def apply_method(model, cfg: SFTConfig) -> dict:
    """Make the right parameters trainable. Returns counts for the summary."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        return {"trainable_params": n, "total_params": n, "lora_modules": 0}
    from lora_kernels.adapters.inject import apply_lora

    try:
        report = apply_lora(
            model,
            target_modules=cfg.target_modules,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            exclude_modules=cfg.exclude_modules,
            modules_to_save=cfg.modules_to_save,
            backend=None if cfg.backend == "auto" else cfg.backend,
            deterministic=cfg.deterministic,
        )
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"LoRA injection failed for target_modules={cfg.target_modules!r}: {e}") from e
    if not report.replaced:
        raise ConfigError(f"target_modules={cfg.target_modules!r} matched no nn.Linear module of the model")
    return {
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "lora_modules": len(report.replaced),
    }


def wrap_model(model, cfg: SFTConfig, device: torch.device):
    """Place the model for training: low-precision frozen base, checkpointing, chunked loss, fused blocks, then
    DDP / FSDP2.

    Returns ``(model, core)``: ``model`` is what the training step calls (maybe a DDP wrapper), ``core`` the
    Hugging Face model itself (generation, exports, checkpoint names).
    """
    from lora_kernels.training.losses import enable_chunked_loss
    from lora_kernels.training.memory import cast_frozen_params, enable_gradient_checkpointing

    if low_precision_base(cfg, device):
        cast_frozen_params(model, torch.bfloat16)  # a no-op for weights already loaded in bf16 (load_dtype)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if resolve_chunked_ce(cfg, device, model)[0]:
        enable_chunked_loss(model, chunk_size=cfg.ce_chunk_size)
    if resolve_fused_blocks(cfg, device)[0]:
        from lora_kernels.models.fused_blocks import fuse_blocks

        model._lk_fused_counts = fuse_blocks(model)
    model = model.to(device)
    strategy = resolve_strategy(cfg)
    mp = torch.bfloat16 if len({p.dtype for p in model.parameters()}) > 1 else None
    wrapped = dist_utils.wrap_model(model, strategy, device=device, mixed_precision=mp)
    return wrapped, dist_utils.unwrap_model(wrapped)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norm weights and embeddings (as HF Trainer does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or "embed" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return groups


def adamw_impl(device: torch.device, strategy: str) -> dict:
    """AdamW's implementation: the fused kernel on CPU and GPU (one pass over all adapter tensors instead of ~10
    ops per tensor; SmolLM2 has 420 LoRA tensors), foreach under FSDP2 (its sharded DTensor parameters)."""
    if strategy == "fsdp":
        return {"foreach": device.type == "cuda"}
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def lr_lambda(cfg: SFTConfig, total_steps: int):
    """Linear warmup to 1 over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``total_steps``."""
    warm, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
