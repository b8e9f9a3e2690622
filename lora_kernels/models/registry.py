"""Model families as data: one table keyed on the Hugging Face ``config.model_type``.

A :class:`ModelFamily` says what the rest of the package needs to know about an architecture: which Auto class
loads it, where its repeated blocks are (activation checkpointing, FSDP wrapping), which modules LoRA targets by
default, and whether packed rows keep examples apart (position ids restart per example and a 4-D block-diagonal
mask reaches every attention layer). A new family is one :func:`register_family` call (or one row below) and a
test that trains it (tests/test_models.py).

A model whose ``model_type`` is not in the table still runs: :func:`family_of` derives a generic entry (the first
of the usual block paths that exists, no packing) and logs once that it did so and how to register the family.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("lora_kernels")

BLOCK_PATHS = ("model.layers", "layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
               "bert.encoder.layer", "encoder.layer")  # fmt: skip


@dataclass(frozen=True)
class ModelFamily:
    model_type: str  # config.model_type
    task: str  # "causal_lm" | "sequence_classification"
    blocks: str  # attribute path of the repeated blocks (an nn.ModuleList)
    default_targets: str | tuple[str, ...] = "all-linear"  # LoRA target_modules when the user names none
    packing: bool = False  # packed rows keep examples apart (position_ids + 4-D mask honoured: tested)
    head: str | None = None  # the task head (kept out of "all-linear"; trained in full when adapting a classifier)
    notes: str = field(default="", compare=False)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Add ``family`` under its ``model_type`` (a second registration needs ``replace=True``)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"family must be a ModelFamily, got {type(family).__name__}")
    if family.task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"family.task must be 'causal_lm' or 'sequence_classification', got {family.task!r}")
    if family.model_type in FAMILIES and not replace:
        raise ValueError(f"model_type {family.model_type!r} is already registered (pass replace=True)")
    FAMILIES[family.model_type] = family
    return family


register_family(ModelFamily("llama", "causal_lm", "model.layers", packing=True, head="lm_head",
                            notes="SmolLM2 (GGUF from PyPI) and the tiny random test models"))  # fmt: skip
register_family(ModelFamily("bert", "sequence_classification", "bert.encoder.layer", head="classifier",
                            notes="MiniLM-L6 (from PyPI) and the tiny random test encoder"))  # fmt: skip

_said: set[str] = set()


def _resolve(model, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def family_of(model) -> ModelFamily:
    """The registered family of ``model`` (an HF model), or a generic one derived from its structure (logged)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    fam = FAMILIES.get(model_type)
    if fam is not None:
        return fam
    from torch import nn

    blocks = next((p for p in BLOCK_PATHS if isinstance(_resolve(model, p), nn.ModuleList)), "")
    task = "sequence_classification" if "SequenceClassification" in type(model).__name__ else "causal_lm"
    if getattr(config, "model_type", None) and model_type not in _said:  # an HF model of an unknown family
        _said.add(model_type)
        logger.warning(
            "lora_kernels: model_type %r is not in lora_kernels.models.FAMILIES; using generic settings (blocks=%r, "
            "no packing): lora_kernels.models.register_family(ModelFamily(...)) pins them",
            model_type,
            blocks or None,
        )
    return ModelFamily(model_type, task, blocks, packing=False)


def blocks_of(model):
    """The repeated blocks of ``model`` (an ``nn.ModuleList``), or None when it has none that we know of."""
    from torch import nn

    fam = family_of(model)
    obj = _resolve(model, fam.blocks) if fam.blocks else None
    if isinstance(obj, nn.ModuleList) and len(obj) > 0:
        return obj
    return None
