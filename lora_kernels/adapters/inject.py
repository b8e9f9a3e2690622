"""Injecting LoRA into any ``nn.Module``: ``apply_lora``, ``merge_lora``, ``unmerge_lora``, ``lora_modules``,
``lora_state_dict``.

Target matching follows PEFT (``peft.tuners.tuners_utils.check_target_module_exists``), on the names of
``model.named_modules()``:

* a list of strings: a module matches when its name equals an entry or ends with ``"." + entry``;
* a single string: ``re.fullmatch(pattern, name)``;
* ``"all-linear"``: every ``nn.Linear`` except the output head (``model.get_output_embeddings()`` when the model
  has one, and any module named ``lm_head``) and the modules in ``modules_to_save`` (e.g. a classifier head).

``exclude_modules`` uses the same rules; ``modules_to_save`` uses the list rule. Every argument and every
matched module is validated before the model is touched, so a failing call leaves the model as it was.

Differences from PEFT, on purpose: LoRA modules replace the ``nn.Linear`` in place (no wrapper model, so the
module paths and ``state_dict`` base keys stay those of the original model), and ``modules_to_save`` modules
are trained in place instead of being copied (PEFT keeps the original and a trainable copy, so its "all params"
count includes the copy; the trainable counts agree).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backends.registry import validate_backend_name
from ..nn.checks import check_adapter_dtype, check_alpha, check_dropout, check_init, check_r
from ..nn.lora import LoRALinear
from .config import LoRAConfig

logger = logging.getLogger("lora_kernels")

ALL_LINEAR = "all-linear"
_SHOW = 12  # how many candidate names an error message lists


@dataclass
class LoRAInjection:
    """What ``apply_lora`` did."""

    replaced: list[str]
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    config: LoRAConfig = field(repr=False, default=None)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (
            f"LoRA on {len(self.replaced)} Linear modules"
            + (f" (+{len(self.modules_to_save)} modules_to_save)" if self.modules_to_save else "")
            + f": trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {100 * self.trainable_fraction:.4f}"
        )


# ----------------------------------------------------------------------------------------------- matching
def _check_patterns(patterns, argname: str, allow_all_linear: bool = False):
    """Normalise a pattern argument to a regex string or a list of names; raise naming ``argname``."""
    if isinstance(patterns, str):
        if allow_all_linear and patterns == ALL_LINEAR:
            return patterns
        try:
            re.compile(patterns)
        except re.error as e:
            raise ValueError(f"{argname} is not a valid regular expression ({e}): {patterns!r}") from None
        return patterns
    if isinstance(patterns, Iterable) and not isinstance(patterns, (bytes, dict)):
        out = list(patterns)
        if all(isinstance(p, str) and p for p in out) and out:
            return out
    raise TypeError(
        f"{argname} must be a non-empty list of module names, a regex string"
        + (" or 'all-linear'" if allow_all_linear else "")
        + f", got {patterns!r}"
    )


def matches(name: str, patterns) -> bool:
    """PEFT's rule: regex fullmatch for a string, exact-or-``.``-suffix for a list."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except NotImplementedError:
            head = None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name == "lm_head" or name.endswith(".lm_head"):
            heads.add(name)
    return heads


def _named_modules_outside_lora(model: nn.Module):
    """``named_modules()`` without the ``lora_A`` / ``lora_B`` children of existing LoRA layers."""
    inside = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LoRALinear):
            inside.append(name + ".")
        yield name, module


def _available_hint(model: nn.Module) -> str:
    linear = [n for n, m in _named_modules_outside_lora(model) if isinstance(m, nn.Linear)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
    some = linear[:_SHOW]
    return (
        f"the model's nn.Linear modules end in {suffixes[: 3 * _SHOW]} ({len(linear)} in all, e.g. {some})"
        if linear
        else f"the model has no nn.Linear modules; its modules include {[n for n, _ in model.named_modules() if n][:_SHOW]}"
    )


@dataclass
class Plan:
    """The resolved, validated result of matching: what ``apply_lora`` will replace and keep trainable."""

    targets: list[str]
    modules_to_save: list[str]


def plan_lora(
    model: nn.Module,
    target_modules,
    r: int,
    exclude_modules=None,
    modules_to_save=None,
    *,
    require_modules_to_save_match: bool = True,
) -> Plan:
    """Resolve patterns to module names and validate every match; never modifies ``model``.

    Existing ``LoRALinear`` layers count as ``nn.Linear`` targets (so an adapter config can be checked against a
    model that already has LoRA); their ``lora_A`` / ``lora_B`` children are never candidates. With
    ``"all-linear"``, modules in ``modules_to_save`` are left out of the targets (they are trained in full), as
    PEFT does for a classifier head. ``require_modules_to_save_match=False`` (used when reading an adapter
    config) skips ``modules_to_save`` entries that match nothing, as PEFT does: its ``SEQ_CLS`` configs list both
    ``classifier`` and ``score``; any tensor in the file for a module that is not there is still an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target_modules = _check_patterns(target_modules, "target_modules", allow_all_linear=True)
    if exclude_modules is not None:
        exclude_modules = _check_patterns(exclude_modules, "exclude_modules")
    if modules_to_save is not None:
        modules_to_save = _check_patterns(modules_to_save, "modules_to_save")
        if isinstance(modules_to_save, str):  # PEFT: a list of names (suffix match)
            modules_to_save = [modules_to_save]
    r = check_r(r)
    named = list(_named_modules_outside_lora(model))

    saves: list[str] = []
    for pattern in modules_to_save or ():
        hits = [n for n, _ in named if matches(n, [pattern])]
        if not hits and require_modules_to_save_match:
            raise ValueError(f"modules_to_save entry {pattern!r} matched no module; {_available_hint(model)}")
        saves.extend(h for h in hits if h not in saves)

    def inside_saved(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in saves)

    if target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        matched = [(n, m) for n, m in named if isinstance(m, nn.Linear) and n not in heads and not inside_saved(n)]
    else:
        matched = [(n, m) for n, m in named if matches(n, target_modules)]
    if not matched:
        raise ValueError(f"target_modules={target_modules!r} matched no module; {_available_hint(model)}")
    if exclude_modules is not None:
        kept = [(n, m) for n, m in matched if not matches(n, exclude_modules)]
        if not kept:
            raise ValueError(
                f"exclude_modules={exclude_modules!r} removed every module matched by target_modules "
                f"({[n for n, _ in matched][:_SHOW]})"
            )
        matched = kept
    for name, module in matched:
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}, not an nn.Linear; LoRA targets must be "
                f"nn.Linear layers ({_available_hint(model)})"
            )
        if r > min(module.in_features, module.out_features):
            raise ValueError(
                f"r={r} is larger than min(in_features, out_features) = "
                f"{min(module.in_features, module.out_features)} of target module {name!r}; r must be <= that"
            )
    targets = [n for n, _ in matched]
    both = sorted(t for t in targets if inside_saved(t))
    if both:
        raise ValueError(
            f"modules_to_save and target_modules both cover {both[:_SHOW]}; a module is either LoRA-adapted or "
            "trained in full, not both"
        )
    return Plan(targets=targets, modules_to_save=saves)


def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    return owners


def _check_not_tied(model: nn.Module, names: list[str], what: str) -> None:
    """Refuse to rewrite a base weight that another module shares (tied embeddings): both would change."""
    owners = _param_owners(model)
    for name in names:
        w = model.get_submodule(name).weight
        shared = [o for o in owners.get(id(w), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"{what} would rewrite the weight of {name!r}, which is shared with {shared} (tied weights); "
                f"untie them first or leave {name!r} out of target_modules"
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique parameters, as PEFT's ``get_nb_trainable_parameters``."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _inject(model: nn.Module, plan: Plan, config: LoRAConfig, adapter_dtype, backend, deterministic) -> LoRAInjection:
    """Replace the planned modules (all arguments already validated) and freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in plan.targets:
        base = model.get_submodule(name)
        layer = LoRALinear.from_linear(
            base,
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            adapter_dtype=adapter_dtype,
            backend=backend,
            deterministic=deterministic,
        )
        _replace(model, name, layer)
    for name in plan.modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.lora_config = config
    trainable, total = count_params(model)
    report = LoRAInjection(list(plan.targets), list(plan.modules_to_save), trainable, total, config)
    logger.info("lora_kernels: %s", report)
    return report


def check_injection_args(model, r, lora_alpha, lora_dropout, adapter_dtype, backend, *, kind: str, hint: str):
    """The argument checks shared by ``apply_lora`` and ``subspace.apply_subspace``; returns the normalised values.

    Raises before anything is changed: bad hyper-parameters, a non-module, or a model that already has an adapter.
    """
    r = check_r(r)
    lora_alpha = check_alpha(lora_alpha)
    lora_dropout = check_dropout(lora_dropout)
    adapter_dtype = check_adapter_dtype(adapter_dtype)
    if backend is not None:
        backend = validate_backend_name(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    existing = lora_modules(model)
    if existing:
        raise ValueError(
            f"model already has {len(existing)} {kind} modules (e.g. {list(existing)[:3]}); one adapter per model: "
            f"{hint}"
        )
    return r, lora_alpha, lora_dropout, adapter_dtype, backend


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
        kind="LoRA",
        hint="call merge_lora(model) first, or load_adapter to replace the adapter weights",
    )
    init = check_init(init_lora_weights)
    plan = plan_lora(model, target_modules, r, exclude_modules, modules_to_save)
    if init == "pissa":
        _check_not_tied(model, plan.targets, "init_lora_weights='pissa'")
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
    return _inject(model, plan, config, adapter_dtype, backend, deterministic)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module name: LoRALinear}`` in ``named_modules`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


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
    pending = [n for n, m in mods.items() if not m.merged]
    _check_not_tied(model, pending, "merge_lora")
    for name in pending:
        try:
            mods[name]._merged_weight(+1.0)  # validation pass: raises on non-finite, writes nothing
        except ValueError as e:
            raise ValueError(f"merge_lora: module {name!r}: {e}") from None
    for name, m in mods.items():
        _replace(model, name, m.to_linear())
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
