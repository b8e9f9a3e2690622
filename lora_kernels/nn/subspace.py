"""The subspace method (LoRA-XS style): train an ``r x r`` matrix between the frozen top-r singular vectors of ``W``.

For each targeted ``nn.Linear`` with ``W = U S Vᵀ`` (``W: [out, in]``)::

    W' = W + s · U_r R V_rᵀ          U_r: [out, r], V_r: [in, r] frozen;  R: [r, r] trainable, R = 0 at start
    y  = x Wᵀ + b + s · ((x ⊙ Z) V_r) Rᵀ U_rᵀ

which is the fused LoRA op with ``A = V_rᵀ`` (``lora_A.weight``), ``B = U_r`` (``lora_B.weight``) and the optional
middle matrix ``lora_R`` of :func:`lora_kernels.functional.lora_linear`: the ``[M, r]`` intermediate ``XA`` is
multiplied by ``Rᵀ`` (``r²`` per row: negligible) before ``B``; no new kernel. The gradient reaching ``R`` is
``dR = s · (G B)ᵀ (X A)``, ``[r, M] · [M, r]`` (DESIGN.md's ``GB`` and ``XA``, both already computed for LoRA).

``s = lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``), as LoRA. Trainable parameters per layer: ``r²`` instead of
LoRA's ``r (in + out)``; e.g. r = 32 on a 384 x 1536 layer: 1,024 vs 61,440.

Bases: computed **once**, at injection (``torch.linalg.svd`` of the weight in fp32, fp64 for an fp64 weight), stored
in the frozen ``lora_A`` / ``lora_B`` of :class:`SubspaceLinear` and never recomputed (not per forward, not to
merge). Signs are made canonical (the largest-magnitude entry of each ``U_r`` column is positive) so that a
recomputation on the same weights gives the same frame. The top-r singular values are kept in the buffer
``svd_sigma`` (fingerprint of the base weight).

Difference from LoRA-XS (Bałazy et al. 2024): LoRA-XS folds ``S_r`` into one factor; here the frame is orthonormal
(``U_r``, ``V_r``), as the issue specifies, so ``‖ΔW‖_F = s · ‖R‖_F`` and one learning rate fits every layer.

File format (written by :func:`save_subspace`, read by :func:`load_subspace`; PEFT has no equivalent):

``subspace_config.json``::

    {"format": "lora_kernels.nn.subspace", "format_version": 1,
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
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checks import check_alpha, check_dropout, check_r, scaling_for
from .lora import LoRALinear

logger = logging.getLogger("lora_kernels")

CONFIG_NAME = "subspace_config.json"
WEIGHTS_NAME = "subspace_model.safetensors"
FORMAT = "lora_kernels.nn.subspace"
FORMAT_VERSION = 1
_PROBE_SEED = 20240521  # fixed: the probe vectors must be the same at save and at load

# Tolerances for the compact-file check. Singular values: perturbation theory bounds |δσ_i| <= ‖δW‖₂, and an fp32
# SVD is backward stable with ‖δW‖₂ ≈ c·n·ε·σ₁ (ε = 6e-8); 1e-4·σ₁ admits c·n up to ~1,700 (two LAPACK builds
# or cuSOLVER agree far better), while a different base model moves σ by orders of magnitude more.
# Frame probe: singular vectors move by ~ε·σ₁/gap; 1e-3 accepts a relative gap down to ~1e-4.
_SIGMA_RTOL = 1e-4
_PROBE_ATOL = 1e-3


def _svd_top(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical-sign top-r ``(U_r [out, r], S_r [r], V_rᵀ [r, in])`` of ``weight`` in fp32 (fp64 for fp64)."""
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(weight.detach().to(dt), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    # sign of the largest-|.| entry of each U column; flip (u_i, v_i) together so U S Vᵀ is unchanged
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u.gather(0, idx[None, :])).squeeze(0)
    sign[sign == 0] = 1
    return u * sign[None, :], s, vh * sign[:, None]


def _probe_vectors(out_features: int, in_features: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(_PROBE_SEED)
    h_out = torch.randn(out_features, generator=g, dtype=torch.float64) / math.sqrt(out_features)
    h_in = torch.randn(in_features, generator=g, dtype=torch.float64) / math.sqrt(in_features)
    return h_out.to(device), h_in.to(device)


class SubspaceLinear(LoRALinear):
    """``LoRALinear`` whose ``lora_A = V_rᵀ`` and ``lora_B = U_r`` are frozen singular vectors of the base weight,
    with a trainable ``lora_R`` (``[r, r]``, zero at init, so the layer starts equal to the base layer).

    Built with :meth:`from_linear` (shares the base Parameters). ``merge()``, ``unmerge()``, ``to_linear()`` and
    ``delta_weight() = s · U_r R V_rᵀ`` come from ``LoRALinear``, which already includes ``lora_R``.
    """

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights="svd",
        adapter_dtype: torch.dtype | None = None,
        backend: str | None = None,
        deterministic: bool = False,
    ) -> SubspaceLinear:
        if init_lora_weights != "svd":
            raise ValueError(f"init_lora_weights must be 'svd' for SubspaceLinear, got {init_lora_weights!r}")
        return super().from_linear(
            linear, r, lora_alpha, lora_dropout, use_rslora, False, adapter_dtype, backend, deterministic
        )

    def _init_lora(
        self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype, backend, deterministic
    ):
        # LoRALinear._init_lora validates everything, builds lora_A/lora_B and calls reset_lora_parameters (below).
        super()._init_lora(r, lora_alpha, lora_dropout, use_rslora, False, adapter_dtype, backend, deterministic)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights="svd") -> None:
        """(Re)compute the frozen bases from the current base weight and set ``R = 0``."""
        if getattr(self, "merged", False):
            raise ValueError("cannot recompute the subspace bases of a merged layer; unmerge() first")
        u, s, vh = _svd_top(self.weight, self.r)
        self.lora_A.weight.copy_(vh)
        self.lora_B.weight.copy_(u)
        self.lora_A.weight.requires_grad_(False)
        self.lora_B.weight.requires_grad_(False)
        self.register_buffer("svd_sigma", s.float(), persistent=False)
        self.lora_R = nn.Parameter(
            torch.zeros(self.r, self.r, device=self.weight.device, dtype=self.lora_A.weight.dtype)
        )

    @torch.no_grad()
    def frame_probe(self) -> torch.Tensor:
        """``[2, r]``: ``U_rᵀ h_out`` and ``V_rᵀ h_in`` for fixed Gaussian vectors; detects a flipped/rotated frame."""
        h_out, h_in = _probe_vectors(self.out_features, self.in_features, self.weight.device)
        u = self.lora_B.weight.double()
        vh = self.lora_A.weight.double()
        return torch.stack([u.t() @ h_out, vh @ h_in]).float()

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", r=", ", subspace r=", 1)


@dataclass
class SubspaceConfig:
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def scaling(self) -> float:
        return scaling_for(self.r, self.lora_alpha, self.use_rslora)


@dataclass
class SubspaceInjection:
    replaced: list[str]
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    config: SubspaceConfig = field(repr=False, default=None)

    def __str__(self) -> str:
        return (
            f"subspace (r={self.config.r}) on {len(self.replaced)} Linear modules"
            + (f" (+{len(self.modules_to_save)} modules_to_save)" if self.modules_to_save else "")
            + f": trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {100 * self.trainable_params / max(1, self.total_params):.4f}"
        )


def subspace_modules(model: nn.Module) -> dict[str, SubspaceLinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, SubspaceLinear)}


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
) -> SubspaceInjection:
    """Replace the matched ``nn.Linear`` modules by :class:`SubspaceLinear` (in place) and freeze the rest.

    Matching (``target_modules``, ``exclude_modules``, ``modules_to_save``) is exactly ``apply_lora``'s. Trainable
    afterwards: each ``lora_R`` and the ``modules_to_save`` parameters. ``model.subspace_config`` records the
    resolved settings. Raises before touching the model when an argument or a match is invalid.
    """
    from ..adapters.inject import _replace, check_injection_args, count_params, plan_lora

    r, lora_alpha, lora_dropout, adapter_dtype, backend = check_injection_args(
        model,
        r,
        lora_alpha,
        lora_dropout,
        adapter_dtype,
        backend,
        kind="LoRA/subspace",
        hint="merge it first (merge_subspace / merge_lora)",
    )
    plan = plan_lora(model, target_modules, r, exclude_modules, modules_to_save)
    model.requires_grad_(False)
    for name in plan.targets:
        layer = SubspaceLinear.from_linear(
            model.get_submodule(name),
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
            backend=backend,
            deterministic=deterministic,
        )
        _replace(model, name, layer)
    for name in plan.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    config = SubspaceConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=bool(use_rslora),
        target_modules=list(plan.targets),
        exclude_modules=exclude_modules,
        modules_to_save=list(plan.modules_to_save),
    )
    model.subspace_config = config
    trainable, total = count_params(model)
    report = SubspaceInjection(list(plan.targets), list(plan.modules_to_save), trainable, total, config)
    logger.info("lora_kernels: %s", report)
    return report


def _mods_or_raise(model: nn.Module) -> dict[str, SubspaceLinear]:
    mods = subspace_modules(model)
    if not mods:
        raise ValueError("model has no subspace modules; call apply_subspace(model, ...) first")
    return mods


def merge_subspace(model: nn.Module) -> nn.Module:
    """Fold ``s · U_r R V_rᵀ`` into every base weight and put plain ``nn.Linear`` back (in place); returns model."""
    from ..adapters.inject import merge_lora

    _mods_or_raise(model)
    merge_lora(model)
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
