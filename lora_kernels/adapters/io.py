"""Adapters in PEFT's on-disk format, both ways: ``save_adapter`` and ``load_adapter``.

A PEFT LoRA adapter directory holds

* ``adapter_config.json``: ``LoraConfig`` fields (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``modules_to_save``, ``use_rslora``, ...);
* ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (``[r, in]``) and
  ``.lora_B.weight`` (``[out, r]``) for each LoRA layer, and ``base_model.model.<module path>.<param>`` for the
  parameters of each ``modules_to_save`` module. The adapter name (``default``) does not appear in the file.

Loading is all-or-nothing: the config, every key, shape, dtype and value is checked first, and only then is any
tensor written (or LoRA injected). Only safetensors is read: a directory with only ``adapter_model.bin`` (a
pickle, which can run code on load) is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backends.registry import validate_backend_name
from ..nn.checks import check_adapter_dtype
from ..nn.lora import LoRALinear
from .config import LoRAConfig
from .inject import inject, lora_modules
from .matching import plan_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_SHOW = 10


@dataclass
class AdapterLoadResult:
    """What ``load_adapter`` did. With ``strict=True`` the two key lists are always empty."""

    loaded_keys: list[str]
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    injected: bool = False  # True when load_adapter applied LoRA to a model that had none


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    return None


def _config_of(model: nn.Module, mods: dict) -> LoRAConfig:
    cfg = getattr(model, "lora_config", None)
    names = list(mods)
    if cfg is None:
        # LoRALinear modules placed by hand: derive a config if they agree on the math.
        first = next(iter(mods.values()))
        for n, m in mods.items():
            if (m.r, m.lora_alpha, m.use_rslora) != (first.r, first.lora_alpha, first.use_rslora):
                raise ValueError(
                    f"LoRA modules disagree on r/lora_alpha/use_rslora ({names[0]!r} vs {n!r}); PEFT's adapter "
                    "format needs one value for the whole model"
                )
        return LoRAConfig(first.r, first.lora_alpha, first.lora_dropout, first.use_rslora, names)
    for n, m in mods.items():
        if (m.r, m.lora_alpha, m.use_rslora) != (cfg.r, cfg.lora_alpha, cfg.use_rslora):
            raise ValueError(
                f"module {n!r} has r={m.r}, lora_alpha={m.lora_alpha}, use_rslora={m.use_rslora} but "
                f"model.lora_config says r={cfg.r}, lora_alpha={cfg.lora_alpha}, use_rslora={cfg.use_rslora}"
            )
    return LoRAConfig(
        cfg.r,
        cfg.lora_alpha,
        cfg.lora_dropout,
        cfg.use_rslora,
        names,
        cfg.exclude_modules,
        list(cfg.modules_to_save),
        cfg.init_lora_weights,
    )


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str | None = None) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads.

    Returns the directory. Files are written to temporaries and renamed, so a failed save leaves no half file.
    """
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA modules to save; call apply_lora(model, ...) first")
    with_r = [n for n, m in mods.items() if m.lora_R is not None]
    if with_r:
        raise ValueError(f"modules {with_r[:_SHOW]} have a lora_R middle matrix, which PEFT's LoRA format cannot hold")
    cfg = _config_of(model, mods)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        # clone: safetensors refuses tensors that share storage, and CPU copies detach from the device.
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu", copy=True).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu", copy=True).contiguous()
    for name in cfg.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{PREFIX}{name}.{pname}"] = p.detach().to("cpu", copy=True).contiguous()
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_cfg = cfg.to_peft_dict(base_model_name_or_path, _task_type(model))

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for fname, write in (
        (WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"})),
        (CONFIG_NAME, lambda path: open(path, "w").write(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")),
    ):
        fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", dir=directory)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, os.path.join(directory, fname))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return directory


def read_adapter(directory) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Parse and check an adapter directory without touching any model: (config, tensors keyed without prefix)."""
    from safetensors.torch import load_file

    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist")
    cfg_path = os.path.join(directory, CONFIG_NAME)
    w_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: an adapter directory needs {CONFIG_NAME}")
    if not os.path.isfile(w_path):
        if os.path.isfile(os.path.join(directory, PICKLE_NAME)):
            raise ValueError(
                f"{directory!r} holds only {PICKLE_NAME} (a pickle); lora_kernels loads safetensors only. Convert it "
                f"with PEFT (save_pretrained(..., safe_serialization=True)) in an environment you trust"
            )
        raise FileNotFoundError(f"{w_path} not found")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    cfg = LoRAConfig.from_peft_dict(raw, source=cfg_path)
    try:
        tensors = load_file(w_path, device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError depending on the damage
        raise ValueError(f"{w_path} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    bad_prefix = [k for k in tensors if not k.startswith(PREFIX)]
    if bad_prefix:
        raise ValueError(
            f"{w_path}: keys {bad_prefix[:_SHOW]} do not start with {PREFIX!r} (not a PEFT adapter for a plain model)"
        )
    return cfg, {k[len(PREFIX) :]: v for k, v in tensors.items()}


def _describe(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{[PREFIX + k for k in keys[:_SHOW]]}{more}"


def load_adapter(
    model: nn.Module,
    directory,
    strict: bool = True,
    *,
    adapter_dtype: torch.dtype | None = None,
    backend: str | None = None,
    deterministic: bool = False,
) -> AdapterLoadResult:
    """Load a PEFT-format LoRA adapter (saved by PEFT or by ``save_adapter``) into ``model``.

    If ``model`` has no LoRA yet, LoRA is first applied as the adapter's config says (``adapter_dtype``,
    ``backend``, ``deterministic`` as in ``apply_lora``; the init is irrelevant, loading overwrites it, and PiSSA
    is never re-run: a PiSSA adapter needs the residual base it was trained on). If it has LoRA, the config's
    ``r`` / ``lora_alpha`` / ``use_rslora`` / targets must agree with the model's.

    ``strict=True``: missing or unexpected keys are errors. ``strict=False``: they are allowed and reported in
    the result (modules without keys keep their current adapter). Mis-shaped, non-float or non-finite tensors
    are always errors. Nothing is written unless every check passes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapter_dtype = check_adapter_dtype(adapter_dtype)
    if backend is not None:
        backend = validate_backend_name(backend)
    cfg, tensors = read_adapter(directory)
    src = os.path.join(os.fspath(directory), CONFIG_NAME)
    mods = lora_modules(model)

    plan = plan_lora(
        model,
        cfg.target_modules,
        cfg.r,
        cfg.exclude_modules,
        cfg.modules_to_save or None,
        require_modules_to_save_match=False,
    )
    if mods:
        problems = []
        mcfg = getattr(model, "lora_config", None)
        for n, m in mods.items():
            for field_name, want in (("r", cfg.r), ("lora_alpha", cfg.lora_alpha), ("use_rslora", cfg.use_rslora)):
                have = getattr(m, field_name)
                if have != want:
                    problems.append(f"{field_name}: adapter has {want!r}, model module {n!r} has {have!r}")
            if m.merged:
                raise ValueError(f"module {n!r} is merged; call unmerge_lora(model) before loading new adapter weights")
        if set(plan.targets) != set(mods):
            only_file = sorted(set(plan.targets) - set(mods))
            only_model = sorted(set(mods) - set(plan.targets))
            problems.append(
                f"target_modules: the adapter targets {only_file[:_SHOW]} which have no LoRA in the model, and the "
                f"model has LoRA on {only_model[:_SHOW]} which the adapter does not target"
            )
        if mcfg is not None and sorted(plan.modules_to_save) != sorted(mcfg.modules_to_save):
            problems.append(
                f"modules_to_save: adapter has {plan.modules_to_save}, model has {list(mcfg.modules_to_save)}"
            )
        if problems:
            # one line per field so the message names each field that disagrees
            raise ValueError(f"{src} disagrees with the LoRA already in the model:\n  " + "\n  ".join(problems))

    expected: dict[str, tuple[int, ...]] = {}
    for name in plan.targets:
        base = model.get_submodule(name)
        expected[f"{name}.lora_A.weight"] = (cfg.r, base.in_features)
        expected[f"{name}.lora_B.weight"] = (base.out_features, cfg.r)
    for name in plan.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            expected[f"{name}.{pname}"] = tuple(p.shape)

    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_describe(unexpected)}")
        raise ValueError(f"adapter in {os.fspath(directory)!r} does not fit the model: " + "; ".join(parts))
    misshaped = [
        f"{PREFIX}{k}: file {tuple(tensors[k].shape)}, expected {shape}"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != shape
    ]
    if misshaped:
        raise ValueError(f"adapter tensors with the wrong shape: {misshaped[:_SHOW]}")
    usable = [k for k in expected if k in tensors]
    not_float = [PREFIX + k for k in usable if not tensors[k].is_floating_point()]
    if not_float:
        raise ValueError(f"adapter tensors {not_float[:_SHOW]} are not floating point")
    not_finite = [PREFIX + k for k in usable if not torch.isfinite(tensors[k]).all()]
    if not_finite:
        raise ValueError(f"adapter tensors {not_finite[:_SHOW]} contain NaN or Inf")

    # ---- every check passed: from here on we write.
    injected = False
    if not mods:
        run_cfg = LoRAConfig(
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            target_modules=list(plan.targets),
            exclude_modules=cfg.exclude_modules,
            modules_to_save=list(plan.modules_to_save),
            init_lora_weights="kaiming",  # overwritten below; never re-run PiSSA on load
        )
        inject(model, LoRALinear, plan, run_cfg, "kaiming", adapter_dtype, backend, deterministic,
               attr="lora_config", label="LoRA")  # fmt: skip
        injected = True
    with torch.no_grad():
        for k in usable:
            model.get_parameter(k).copy_(tensors[k])
    return AdapterLoadResult(
        loaded_keys=[PREFIX + k for k in usable],
        missing_keys=[PREFIX + k for k in missing],
        unexpected_keys=[PREFIX + k for k in unexpected],
        injected=injected,
    )
