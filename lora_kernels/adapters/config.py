"""Adapter configs: ``AdapterConfig`` (what every injection records), ``LoRAConfig`` (+ the mapping to PEFT's
``adapter_config.json``) and ``SubspaceConfig`` (the subspace method: nothing beyond the common fields).

Only the fields that this package implements are mapped. A PEFT config that asks for a feature we do not
implement (DoRA, trainable biases, per-module rank/alpha patterns, ...) is refused with an error that names the
field, rather than loaded with that feature silently dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..nn.checks import check_alpha, check_dropout, check_r, scaling_for

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


@dataclass
class AdapterConfig:
    """The resolved settings of one injection: ``target_modules`` holds the resolved module names, not the patterns."""

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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SubspaceConfig(AdapterConfig):
    """What ``apply_subspace`` did (the common fields; the file format adds its own keys)."""


@dataclass
class LoRAConfig(AdapterConfig):
    """What ``apply_lora`` did."""

    init_lora_weights: str | bool = "kaiming"

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
