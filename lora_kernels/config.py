"""``LoRAConfig``: the resolved settings of one LoRA injection, and their mapping to PEFT's ``adapter_config.json``.

Only the fields that this package implements are mapped. A PEFT config that asks for a feature we do not
implement (DoRA, trainable biases, per-module rank/alpha patterns, ...) is refused with an error that names the
field, rather than loaded with that feature silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

INIT_CHOICES = ("kaiming", "gaussian", "pissa", False)

# PEFT spells the default init ``True``; we spell it "kaiming" (same math: A kaiming-uniform(a=sqrt 5), B = 0).
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", False: False}
_INIT_FROM_PEFT = {True: "kaiming", "gaussian": "gaussian", "pissa": "pissa", False: False}

# PEFT config fields whose non-default values change the math or the weights we would load. Each maps to the
# values that mean "feature off"; anything else is refused by ``from_peft_dict``.
_PEFT_FEATURES_OFF = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "megatron_config": (None,),
}


def check_r(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int (the LoRA rank), got {r!r}")
    return r


def check_alpha(lora_alpha) -> float:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite positive number, got {lora_alpha!r}")
    if lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a finite positive number, got {lora_alpha!r}")
    return lora_alpha


def check_dropout(lora_dropout) -> float:
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, (int, float))
        or not (0.0 <= float(lora_dropout) < 1.0)
    ):
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
    return float(lora_dropout)


def check_init(init_lora_weights):
    # `True` is accepted as PEFT's spelling of the default.
    if init_lora_weights is True:
        return "kaiming"
    if init_lora_weights not in INIT_CHOICES or isinstance(init_lora_weights, int) and init_lora_weights is not False:
        raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES} (or True), got {init_lora_weights!r}")
    return init_lora_weights


def check_adapter_dtype(adapter_dtype):
    if adapter_dtype is None:
        return None
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise TypeError(f"adapter_dtype must be None or a floating torch.dtype, got {adapter_dtype!r}")
    return adapter_dtype


def scaling_for(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023), as PEFT computes it."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass
class LoRAConfig:
    """What ``apply_lora`` did: ``target_modules`` holds the resolved module names, not the patterns."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    init_lora_weights: str | bool = "kaiming"

    @property
    def scaling(self) -> float:
        return scaling_for(self.r, self.lora_alpha, self.use_rslora)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_peft_dict(self, base_model_name_or_path: str | None = None, task_type: str | None = None) -> dict:
        """The ``adapter_config.json`` PEFT's ``LoraConfig.from_pretrained`` reads.

        ``init_lora_weights`` is written as ``True`` for every init: the adapter file holds trained weights, and
        a PiSSA value would make PEFT re-run the SVD on load and rewrite the base weights. A PiSSA adapter is
        only meaningful on top of the *residual* base weights (see ``LoRALinear``).
        """
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
            "exclude_modules": self.exclude_modules,
            "modules_to_save": list(self.modules_to_save) or None,
            "init_lora_weights": True,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "lora_bias": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict, source: str = "adapter_config.json") -> LoRAConfig:
        """Parse PEFT's ``adapter_config.json``; ``target_modules`` stays a pattern (list or regex string).

        Raises ``ValueError`` naming the field for a non-LoRA adapter, an unsupported feature or a bad value.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: field 'peft_type' must be 'LORA', got {d.get('peft_type')!r}")
        for key, off_values in _PEFT_FEATURES_OFF.items():
            if key in d and d[key] not in off_values:
                raise ValueError(
                    f"{source}: field {key!r} = {d[key]!r} is not supported by lora_kernels "
                    f"(supported: {off_values[0]!r}); refusing to load an adapter whose math would differ"
                )
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in d:
                raise ValueError(f"{source}: required field {key!r} is missing")
        targets = d["target_modules"]
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise ValueError(f"{source}: field 'target_modules' must be a string or a list of strings, got {targets!r}")
        init = d.get("init_lora_weights", True)
        if not isinstance(init, (bool, str)) or init not in _INIT_FROM_PEFT:
            init = "kaiming"  # only affects initialisation, which loading overwrites
        try:
            r = check_r(d["r"])
            alpha = check_alpha(d["lora_alpha"])
            dropout = check_dropout(d.get("lora_dropout", 0.0) or 0.0)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return cls(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            use_rslora=bool(d.get("use_rslora", False)),
            target_modules=targets if isinstance(targets, str) else list(targets),
            exclude_modules=d.get("exclude_modules"),
            modules_to_save=list(d.get("modules_to_save") or []),
            init_lora_weights=_INIT_FROM_PEFT[init],
        )
