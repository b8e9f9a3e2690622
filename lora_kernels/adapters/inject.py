"""Injecting adapters into any ``nn.Module``: one injection (:func:`inject`) used by LoRA (``apply_lora``, here)
and by the subspace method (``apply_subspace``, adapters/subspace.py); ``merge_lora``, ``unmerge_lora``,
``lora_modules``, ``lora_state_dict``. Matching rules: adapters/matching.py (PEFT's).

Differences from PEFT, on purpose: adapter layers replace the ``nn.Linear`` in place (no wrapper model, so the
module paths and ``state_dict`` base keys stay those of the original model), and ``modules_to_save`` modules
are trained in place instead of being copied (PEFT keeps the original and a trainable copy, so its "all params"
count includes the copy; the trainable counts agree).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backends.registry import validate_backend_name
from ..nn.checks import check_adapter_dtype, check_alpha, check_dropout, check_init, check_r
from ..nn.core import AdapterLinear
from ..nn.lora import LoRALinear
from ..quant.nf4 import is_params4bit
from .config import AdapterConfig, LoRAConfig
from .matching import Plan, check_not_tied, plan_lora, replace_module

logger = logging.getLogger("lora_kernels")


@dataclass
class Injection:
    """What an injection did."""

    replaced: list[str]
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    config: AdapterConfig = field(repr=False, default=None)
    label: str = field(repr=False, default="LoRA")

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (
            f"{self.label} on {len(self.replaced)} Linear modules"
            + (f" (+{len(self.modules_to_save)} modules_to_save)" if self.modules_to_save else "")
            + f": trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {100 * self.trainable_fraction:.4f}"
        )


LoRAInjection = Injection  # what apply_lora returns (the name of earlier releases)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique parameters, as PEFT's ``get_nb_trainable_parameters``."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def adapter_modules(model: nn.Module, cls: type = AdapterLinear) -> dict:
    """``{module name: layer}`` of the adapter layers of class ``cls`` in ``named_modules`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def inject(model: nn.Module, layer_cls: type, plan: Plan, config: AdapterConfig, init, adapter_dtype, backend,
           deterministic, *, attr: str, label: str) -> Injection:  # fmt: skip
    """Replace the planned modules by ``layer_cls.from_linear(...)`` (all arguments already validated), freeze
    everything else, train ``modules_to_save``, record ``config`` as ``model.<attr>``; returns the report."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in plan.targets:
        layer = layer_cls.from_linear(
            model.get_submodule(name),
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=init,
            adapter_dtype=adapter_dtype,
            backend=backend,
            deterministic=deterministic,
        )
        replace_module(model, name, layer)
    for name in plan.modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    setattr(model, attr, config)
    trainable, total = count_params(model)
    report = Injection(list(plan.targets), list(plan.modules_to_save), trainable, total, config, label)
    logger.info("lora_kernels: %s", report)
    return report


def check_injection_args(model, r, lora_alpha, lora_dropout, adapter_dtype, backend, *, hint: str):
    """The argument checks shared by every injection; returns the normalised values.

    Raises before anything is changed: bad hyper-parameters, a non-module, or a model that already has an adapter.
    """
    r = check_r(r)
    lora_alpha = check_alpha(lora_alpha)
    lora_dropout = check_dropout(lora_dropout)
    adapter_dtype = check_adapter_dtype(adapter_dtype)
    if backend is not None:
        backend = validate_backend_name(backend)
    existing = adapter_modules(model)
    if existing:
        kinds = "/".join(sorted({m.KIND for m in existing.values()}))
        raise ValueError(
            f"model already has {len(existing)} {kinds} modules (e.g. {list(existing)[:3]}); one adapter per model: "
            f"{hint}"
        )
    return r, lora_alpha, lora_dropout, adapter_dtype, backend


def merge_adapters(model: nn.Module, mods: dict, what: str) -> nn.Module:
    """Fold every layer of ``mods`` into its base weight and put plain ``nn.Linear`` modules back, in place. All
    merges are checked for finiteness before any weight is written, so a refused merge leaves the model untouched."""
    pending = [n for n, m in mods.items() if not m.merged]
    check_not_tied(model, pending, what)
    for name in pending:
        try:
            mods[name]._merged_weight(+1.0)  # validation pass: raises on non-finite, writes nothing
        except ValueError as e:
            raise ValueError(f"{what}: module {name!r}: {e}") from None
    for name, m in mods.items():
        if is_params4bit(m.weight):  # a 4-bit base: re-quantized like PEFT's merge_and_unload (with its warning)
            from ..quant.convert import requantized_linear4bit

            replace_module(model, name, requantized_linear4bit(m.weight, m.bias, m._merged_weight(+1.0), m.training))
        else:
            replace_module(model, name, m.to_linear())
    return model


def apply_lora(
    model: nn.Module,
    target_modules="all-linear",
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    init_lora_weights: str | bool = "kaiming",
    exclude_modules=None,
    modules_to_save=None,
    adapter_dtype: torch.dtype | None = None,
    backend: str | None = None,
    deterministic: bool = False,
) -> LoRAInjection:
    """Replace the matched ``nn.Linear`` modules of ``model`` by ``LoRALinear`` (in place) and freeze the rest.

    Trainable afterwards: every ``lora_A`` / ``lora_B`` weight and the parameters of ``modules_to_save``.
    ``model.lora_config`` records the resolved settings; the returned ``LoRAInjection`` lists what was replaced
    and the parameter counts. Raises before touching the model when any argument or match is invalid.
    """
    r, lora_alpha, lora_dropout, adapter_dtype, backend = check_injection_args(
        model,
        r,
        lora_alpha,
        lora_dropout,
        adapter_dtype,
        backend,
        hint="call merge_lora(model) first, or load_adapter to replace the adapter weights",
    )
    init = check_init(init_lora_weights)
    plan = plan_lora(model, target_modules, r, exclude_modules, modules_to_save)
    if init == "pissa":
        check_not_tied(model, plan.targets, "init_lora_weights='pissa'")
    config = LoRAConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=bool(use_rslora),
        target_modules=list(plan.targets),
        exclude_modules=exclude_modules,
        modules_to_save=list(plan.modules_to_save),
        init_lora_weights=init,
    )
    return inject(model, LoRALinear, plan, config, config.init_lora_weights, adapter_dtype, backend, deterministic,
                  attr="lora_config", label="LoRA")  # fmt: skip


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module name: LoRALinear}`` in ``named_modules`` order."""
    return adapter_modules(model, LoRALinear)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (``lora_A`` / ``lora_B`` weights and ``modules_to_save`` parameters), keyed as in
    ``model.state_dict()``."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA modules; call apply_lora(model, ...) first")
    out = {}
    for name, m in mods.items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
        if m.lora_R is not None:
            out[f"{name}.lora_R"] = m.lora_R.detach()
    cfg = getattr(model, "lora_config", None)
    for name in cfg.modules_to_save if cfg is not None else ():
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{name}.{pname}"] = p.detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` modules back (PEFT's
    ``merge_and_unload``). In place; returns ``model``. All merges are checked for finiteness before any weight
    is written, so a refused merge leaves the whole model untouched."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA modules to merge; call apply_lora(model, ...) first")
    merge_adapters(model, mods, "merge_lora")
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``LoRALinear.merge()`` on every merged LoRA module of ``model`` (in place); returns ``model``."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA modules (after merge_lora the adapters are gone and cannot be unmerged)")
    for name, m in mods.items():
        if m.merged:
            try:
                m._merged_weight(-1.0)
            except ValueError as e:
                raise ValueError(f"unmerge_lora: module {name!r}: {e}") from None
    for m in mods.values():
        m.unmerge()
    return model
