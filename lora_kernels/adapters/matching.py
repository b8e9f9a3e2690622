"""Which modules an injection targets: PEFT's matching rules on ``model.named_modules()`` names.

* a list of strings: a module matches when its name equals an entry or ends with ``"." + entry``;
* a single string: ``re.fullmatch(pattern, name)``;
* ``"all-linear"``: every ``nn.Linear`` except the output head (``model.get_output_embeddings()`` when the model
  has one, and any module named ``lm_head``) and the modules in ``modules_to_save`` (e.g. a classifier head).

``exclude_modules`` uses the same rules; ``modules_to_save`` uses the list rule. Every argument and every
matched module is validated before the model is touched (:func:`plan_lora` never modifies the model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..nn.checks import check_r
from ..nn.core import AdapterLinear

ALL_LINEAR = "all-linear"
_SHOW = 12  # how many candidate names an error message lists


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
    """``named_modules()`` without the ``lora_A`` / ``lora_B`` children of existing adapter layers."""
    inside = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, AdapterLinear):
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

    Existing adapter layers (``LoRALinear``, ``SubspaceLinear``) count as ``nn.Linear`` targets (so an adapter config can be checked against a
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


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    return owners


def check_not_tied(model: nn.Module, names: list[str], what: str) -> None:
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
