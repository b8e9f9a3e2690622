"""The subspace method's injection and files: ``apply_subspace``, ``merge_subspace``, ``save_subspace``,
``load_subspace`` (the layer and its math: :mod:`lora_kernels.nn.subspace`).

File format (written by :func:`save_subspace`, read by :func:`load_subspace`; PEFT has no equivalent):

``subspace_config.json``::

    {"format": "lora_kernels.subspace", "format_version": 1,
     "r": 32, "lora_alpha": 32, "lora_dropout": 0.0, "use_rslora": false, "scaling": 1.0,
     "target_modules": ["bert.encoder.layer.0.attention.self.query", ...],   # resolved module names
     "exclude_modules": ..., "modules_to_save": ["classifier"],
     "bases_included": true, "base_model_name_or_path": "..."}

``subspace_model.safetensors`` (keys are ``model.state_dict()`` module paths)::

    <module>.lora_R            [r, r]    adapter dtype   the trained matrix
    <module>.svd_sigma         [r]       fp32            top-r singular values of the base weight (fingerprint)
    <module>.svd_probe         [2, r]    fp32            U_rᵀ h_out and V_rᵀ h_in for fixed Gaussian h (frame check)
    <module>.lora_A.weight     [r, in]   adapter dtype   V_rᵀ   } only when bases_included (the default): makes the
    <module>.lora_B.weight     [out, r]  adapter dtype   U_r    } file independent of how the SVD is recomputed
    <save module>.<param>      ...                        modules_to_save parameters (e.g. the classifier head)

Without the bases (``include_bases=False``: ``r²`` numbers per layer) loading recomputes the SVD of the base
weights and refuses, naming the module, when the singular values or the frame probe differ from the saved ones
(a different base model, or a near-degenerate spectrum whose singular vectors the SVD does not pin down).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..nn.checks import check_alpha, check_dropout, check_r
from ..nn.subspace import SubspaceLinear
from .config import SubspaceConfig
from .inject import Injection, adapter_modules, check_injection_args, inject, merge_adapters
from .matching import plan_lora

SubspaceInjection = Injection  # what apply_subspace returns (the name of earlier releases)

logger = logging.getLogger("lora_kernels")

CONFIG_NAME = "subspace_config.json"
WEIGHTS_NAME = "subspace_model.safetensors"
FORMAT = "lora_kernels.subspace"  # the file format's name (kept when the module moved)
FORMAT_VERSION = 1

# Tolerances for the compact-file check. Singular values: perturbation theory bounds |δσ_i| <= ‖δW‖₂, and an fp32
# SVD is backward stable with ‖δW‖₂ ≈ c·n·ε·σ₁ (ε = 6e-8); 1e-4·σ₁ admits c·n up to ~1,700 (two LAPACK builds
# or cuSOLVER agree far better), while a different base model moves σ by orders of magnitude more.
# Frame probe: singular vectors move by ~ε·σ₁/gap; 1e-3 accepts a relative gap down to ~1e-4.
_SIGMA_RTOL = 1e-4
_PROBE_ATOL = 1e-3


def subspace_modules(model: nn.Module) -> dict[str, SubspaceLinear]:
    return adapter_modules(model, SubspaceLinear)


def apply_subspace(
    model: nn.Module,
    target_modules="all-linear",
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    exclude_modules=None,
    modules_to_save=None,
    adapter_dtype: torch.dtype | None = None,
    backend: str | None = None,
    deterministic: bool = False,
) -> Injection:
    """Replace the matched ``nn.Linear`` modules by :class:`SubspaceLinear` (in place) and freeze the rest.

    Matching (``target_modules``, ``exclude_modules``, ``modules_to_save``) is exactly ``apply_lora``'s. Trainable
    afterwards: each ``lora_R`` and the ``modules_to_save`` parameters. ``model.subspace_config`` records the
    resolved settings. Raises before touching the model when an argument or a match is invalid.
    """
    r, lora_alpha, lora_dropout, adapter_dtype, backend = check_injection_args(
        model, r, lora_alpha, lora_dropout, adapter_dtype, backend, hint="merge it first (merge_subspace / merge_lora)"
    )
    plan = plan_lora(model, target_modules, r, exclude_modules, modules_to_save)
    config = SubspaceConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=bool(use_rslora),
        target_modules=list(plan.targets),
        exclude_modules=exclude_modules,
        modules_to_save=list(plan.modules_to_save),
    )
    return inject(model, SubspaceLinear, plan, config, "svd", adapter_dtype, backend, deterministic,
                  attr="subspace_config", label=f"subspace (r={r})")  # fmt: skip


def _mods_or_raise(model: nn.Module) -> dict[str, SubspaceLinear]:
    mods = subspace_modules(model)
    if not mods:
        raise ValueError("model has no subspace modules; call apply_subspace(model, ...) first")
    return mods


def merge_subspace(model: nn.Module) -> nn.Module:
    """Fold ``s · U_r R V_rᵀ`` into every base weight and put plain ``nn.Linear`` back (in place); returns model."""
    merge_adapters(model, _mods_or_raise(model), "merge_subspace")
    if hasattr(model, "subspace_config"):
        del model.subspace_config
    return model


def subspace_state_dict(model: nn.Module, include_bases: bool = True) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_subspace` writes (see the module docstring), keyed by module path."""
    mods = _mods_or_raise(model)
    out: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        out[f"{name}.lora_R"] = m.lora_R.detach()
        out[f"{name}.svd_sigma"] = m.svd_sigma.detach().float()
        out[f"{name}.svd_probe"] = m.frame_probe()
        if include_bases:
            out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
            out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    cfg = getattr(model, "subspace_config", None)
    for name in cfg.modules_to_save if cfg is not None else ():
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{name}.{pname}"] = p.detach()
    return out


def save_subspace(
    model: nn.Module, directory: str | Path, include_bases: bool = True, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``subspace_config.json`` + ``subspace_model.safetensors`` into ``directory``; returns the directory."""
    from safetensors.torch import save_file

    _mods_or_raise(model)
    cfg: SubspaceConfig | None = getattr(model, "subspace_config", None)
    if cfg is None:
        raise ValueError("model has subspace modules but no subspace_config; inject with apply_subspace")
    if any(m.merged for m in subspace_modules(model).values()):
        raise ValueError("cannot save while subspace layers are merged into the base weights; unmerge() first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in subspace_state_dict(model, include_bases).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **asdict(cfg),
        "scaling": cfg.scaling,
        "bases_included": bool(include_bases),
        "base_model_name_or_path": base_model_name_or_path,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "lora_kernels": FORMAT})
    return directory


def read_subspace_config(directory: str | Path) -> tuple[SubspaceConfig, dict]:
    """``(SubspaceConfig, raw dict)`` from ``directory/subspace_config.json``; errors name the bad field."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a subspace adapter directory (save_subspace writes it)")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT!r}, got {raw.get('format')!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported format_version {raw.get('format_version')!r} (this reads {FORMAT_VERSION})"
        )
    fields = set(SubspaceConfig.__dataclass_fields__)
    missing = sorted(f for f in ("r", "lora_alpha", "target_modules") if f not in raw)
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    cfg = SubspaceConfig(**{k: v for k, v in raw.items() if k in fields})
    check_r(cfg.r)
    check_alpha(cfg.lora_alpha)
    check_dropout(cfg.lora_dropout)
    if not isinstance(cfg.target_modules, list) or not cfg.target_modules:
        raise ValueError(f"{path}: field 'target_modules' must be a non-empty list of module names")
    return cfg, raw


@torch.no_grad()
def load_subspace(
    model: nn.Module, directory: str | Path, strict: bool = True, backend: str | None = None
) -> nn.Module:
    """Load a :func:`save_subspace` directory into ``model`` (in place); returns ``model``.

    A model without subspace layers gets them first (``apply_subspace`` with the saved config, on the saved
    module names). With ``bases_included`` the saved frames replace the recomputed ones; otherwise the recomputed
    SVD must reproduce the saved singular values and frame probe. ``strict``: missing or unexpected keys are an
    error (shapes always are).
    """
    from safetensors.torch import load_file

    cfg, raw = read_subspace_config(directory)
    mods = subspace_modules(model)
    if not mods:
        apply_subspace(
            model,
            target_modules=cfg.target_modules,
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            modules_to_save=cfg.modules_to_save or None,
            backend=backend,
        )
        mods = subspace_modules(model)
    else:
        have: SubspaceConfig | None = getattr(model, "subspace_config", None)
        for f in ("r", "lora_alpha", "use_rslora"):
            if have is not None and getattr(have, f) != getattr(cfg, f):
                raise ValueError(
                    f"adapter field {f!r} is {getattr(cfg, f)!r} but the model's subspace layers have {getattr(have, f)!r}"
                )
        if sorted(mods) != sorted(cfg.target_modules):
            raise ValueError(
                f"adapter targets {sorted(set(cfg.target_modules) - set(mods))[:8]} are not subspace layers of the "
                f"model, and model layers {sorted(set(mods) - set(cfg.target_modules))[:8]} are not in the adapter"
            )
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    bases = bool(raw.get("bases_included", True))
    expected: dict[str, tuple[int, ...]] = {}
    for name, m in mods.items():
        expected[f"{name}.lora_R"] = (m.r, m.r)
        expected[f"{name}.svd_sigma"] = (m.r,)
        expected[f"{name}.svd_probe"] = (2, m.r)
        if bases:
            expected[f"{name}.lora_A.weight"] = tuple(m.lora_A.weight.shape)
            expected[f"{name}.lora_B.weight"] = tuple(m.lora_B.weight.shape)
    for name in cfg.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            expected[f"{name}.{pname}"] = tuple(p.shape)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if strict and (missing or extra):
        raise ValueError(f"subspace adapter {directory}: missing keys {missing[:8]}, unexpected keys {extra[:8]}")
    for key in sorted(set(expected) & set(tensors)):
        if tuple(tensors[key].shape) != expected[key]:
            raise ValueError(
                f"subspace adapter key {key!r} has shape {tuple(tensors[key].shape)}, model expects {expected[key]}"
            )
    for name, m in mods.items():
        if f"{name}.lora_R" not in tensors:
            continue
        if bases:
            m.lora_A.weight.copy_(tensors[f"{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{name}.lora_B.weight"])
            m.svd_sigma.copy_(tensors[f"{name}.svd_sigma"])
        else:
            want = tensors[f"{name}.svd_sigma"].to(m.svd_sigma.device)
            err = (m.svd_sigma - want).abs().max().item()
            if err > _SIGMA_RTOL * max(want.abs().max().item(), 1e-30):
                raise ValueError(
                    f"module {name!r}: the base weight's top-{m.r} singular values differ from the adapter's "
                    f"(max |Δσ| = {err:.3g}): this adapter was trained on a different base model"
                )
            perr = (m.frame_probe() - tensors[f"{name}.svd_probe"].to(m.svd_sigma.device)).abs().max().item()
            if perr > _PROBE_ATOL:
                raise ValueError(
                    f"module {name!r}: the recomputed singular vectors differ from the adapter's (probe error "
                    f"{perr:.3g}); the spectrum is too degenerate to recompute — save with include_bases=True"
                )
        m.lora_R.copy_(tensors[f"{name}.lora_R"])
    for name in cfg.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            key = f"{name}.{pname}"
            if key in tensors:
                p.copy_(tensors[key])
    return model
