"""Making and unmaking 4-bit bases with bitsandbytes' own quantizer.

* :func:`quantize_model`: replace a model's ``nn.Linear`` layers by ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4,
  optionally double-quantized), quantized by ``bitsandbytes.functional.quantize_4bit``. A Hugging Face model also
  gets the ``BitsAndBytesConfig`` and quantizer that ``from_pretrained(quantization_config=...)`` would attach, and
  keeps the same modules in full precision (``get_keys_to_not_convert``: the output head, tied weights), so
  ``save_pretrained`` writes an ordinary HF 4-bit checkpoint (``AutoModelForCausalLM.from_pretrained`` reloads it
  without lora_kernels).
* :func:`prepare_linear4bit`: what ``LoRALinear.from_linear`` does to a ``Linear4bit`` before sharing its weight:
  checks it is quantized and restores bitsandbytes' standard layout when its CPU inference path repacked it.
* :func:`requantized_linear4bit`: a new ``Linear4bit`` holding a merged full-precision weight re-quantized in the
  original format (PEFT's ``merge_and_unload`` on a 4-bit base), with PEFT's warning about rounding.
* :func:`dequantize_model`: every 4-bit base back to a full-precision tensor (the values training saw,
  bit-identical to bitsandbytes' dequantization) and the Hugging Face quantization config removed: what the
  QLoRA recipe merges into (``merge_lora`` afterwards folds the adapters without re-quantizing; what
  ``lora-kernels sft --merge`` exports for a 4-bit run).

bitsandbytes (and transformers) are imported inside the functions only.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .nf4 import BLOCKSIZES, QUANT_TYPES, dequantize, describe, is_params4bit

logger = logging.getLogger("lora_kernels")
MERGE_WARNING = (
    "Merging LoRA into a 4-bit base dequantizes it, adds the update and re-quantizes it: the merged model rounds "
    "differently from base + adapter (PEFT warns the same: generations may differ)"
)


@dataclass
class QuantReport:
    """What :func:`quantize_model` did: modules replaced, bytes of their weights before and after."""

    quant_type: str
    double_quant: bool
    blocksize: int
    modules: list[str]
    kept: list[str]  # nn.Linear modules left in full precision
    bytes_4bit: int  # packed codes + scales of the replaced weights
    bytes_bf16: int  # the same weights in bf16

    @property
    def ratio_to_bf16(self) -> float:
        return self.bytes_4bit / self.bytes_bf16 if self.bytes_bf16 else 0.0

    def __str__(self) -> str:
        dq = " + double quant" if self.double_quant else ""
        return (
            f"frozen base -> {self.quant_type}{dq} (blocksize {self.blocksize}, bitsandbytes): {len(self.modules)} "
            f"Linear modules, {self.bytes_bf16 / 2**20:.1f} MiB in bf16 -> {self.bytes_4bit / 2**20:.1f} MiB "
            f"({self.ratio_to_bf16:.3f}x); kept in full precision: {self.kept}"
        )


def _require_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            f"a 4-bit base needs bitsandbytes (pip install 'lora_kernels[qlora]' or pip install bitsandbytes): {e}"
        ) from None
    return bnb


def _skipped(model: nn.Module, skip) -> set[str]:
    names = set(skip or ())
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        return names
    if isinstance(model, PreTrainedModel):
        names |= set(get_keys_to_not_convert(model))
    return names


def _new_linear4bit(bnb, like: nn.Linear, weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int,
                    compute_dtype, quant_storage) -> nn.Module:  # fmt: skip
    device = weight.device
    new = bnb.nn.Linear4bit(like.in_features, like.out_features, bias=like.bias is not None,
                            compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                            quant_storage=quant_storage, device="meta")  # fmt: skip
    new.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, blocksize=blocksize,
                                   compress_statistics=double_quant, quant_type=quant_type,
                                   quant_storage=quant_storage, module=new)._quantize(device)  # fmt: skip
    new.bias = like.bias
    new.train(like.training)
    return new


def _attach_hf_config(model, quant_type, double_quant, compute_dtype, skipped, quant_storage) -> None:
    """What ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` leaves on a model, so that
    ``save_pretrained`` writes a 4-bit checkpoint that transformers reloads as one."""
    try:
        from transformers import BitsAndBytesConfig, PreTrainedModel
        from transformers.quantizers import AutoHfQuantizer
        from transformers.quantizers.base import _assign_is_quantized
    except ImportError:
        return
    if not isinstance(model, PreTrainedModel):
        return
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                             bnb_4bit_quant_storage=quant_storage,
                             llm_int8_skip_modules=sorted(skipped) or None)  # fmt: skip
    model.config.quantization_config = cfg
    model.hf_quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=False)
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    _assign_is_quantized(model)


def quantize_model(model: nn.Module, quant_type: str = "nf4", *, double_quant: bool = True, blocksize: int = 64,
                   compute_dtype: torch.dtype | None = None, skip=None,
                   quant_storage: torch.dtype = torch.uint8) -> QuantReport:  # fmt: skip
    """Replace every ``nn.Linear`` of ``model`` (in place, on its current device) by a bitsandbytes ``Linear4bit``,
    except ``skip`` (module names) and, for a Hugging Face model, the modules transformers keeps in full precision.

    ``compute_dtype`` (default: each layer's weight dtype) is the ``Linear4bit``'s own compute dtype; lora_kernels'
    op computes in the activations' dtype. Returns a :class:`QuantReport`. Raises before changing anything when an
    argument is invalid or the model already holds 4-bit layers.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    bnb = _require_bnb()
    if any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        raise ValueError(
            "model already has bitsandbytes Linear4bit layers; quantize_model expects a full-precision one"
        )
    skipped = _skipped(model, skip)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    kept = sorted(n for n, _ in linears if n in skipped)
    done, b4, b16, seen = [], 0, 0, set()
    for name, mod in linears:
        if name in skipped:
            continue
        new = _new_linear4bit(bnb, mod, mod.weight, quant_type, double_quant, blocksize,
                              compute_dtype or mod.weight.dtype, quant_storage)  # fmt: skip
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        done.append(name)
        b4 += describe(new.weight).nbytes(seen)
        b16 += mod.weight.numel() * 2
    if not done:
        raise ValueError(f"quantize_model found no nn.Linear to quantize (kept in full precision: {kept})")
    _attach_hf_config(model, quant_type, double_quant, compute_dtype or torch.float32, set(kept), quant_storage)
    report = QuantReport(quant_type, double_quant, blocksize, done, kept, b4, b16)
    logger.info("lora_kernels: %s", report)
    return report


def prepare_linear4bit(linear: nn.Module) -> None:
    """Check a ``Linear4bit``'s weight is usable as a LoRA base; undo bitsandbytes' CPU inference repacking (which
    its eval-mode forward applies on AVX512-BF16 CPUs) in place, as bitsandbytes' own ``state_dict`` does. The codes
    come back exactly; the scales as that repacking left them (rounded to bf16: bitsandbytes' loss, not ours)."""
    weight = linear.weight
    qs = getattr(weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, qs)
        if getattr(linear, "quant_state", None) is not None:
            linear.quant_state = weight.quant_state
        logger.info("lora_kernels: restored bitsandbytes' standard 4-bit layout of a Linear4bit (it had been "
                    "repacked for bitsandbytes' CPU inference kernel)")  # fmt: skip
    describe(weight, "linear.weight")


def requantized_linear4bit(weight, bias, merged: torch.Tensor, training: bool) -> nn.Module:
    """A ``Linear4bit`` holding ``merged`` (full precision) quantized in ``weight``'s format (quant type, blocksize,
    double quantization, storage dtype), with ``bias`` shared; warns like PEFT."""
    if not is_params4bit(weight):
        raise TypeError(f"weight must be a bitsandbytes Params4bit, got {type(weight).__name__}")
    bnb = _require_bnb()
    q = describe(weight)
    warnings.warn(MERGE_WARNING, UserWarning, stacklevel=3)
    like = nn.Linear(q.in_features, q.out_features, bias=bias is not None, device="meta")
    like.bias = bias
    like.train(training)
    compute = getattr(getattr(weight, "module", None), "compute_dtype", None)
    return _new_linear4bit(bnb, like, merged.to(q.dequant_dtype), q.quant_type, q.nested, q.blocksize, compute,
                           getattr(weight, "quant_storage", torch.uint8))  # fmt: skip


def _drop_hf_quantization(model: nn.Module) -> None:
    """Undo :func:`_attach_hf_config` (or ``from_pretrained(quantization_config=...)``): a plain model again."""
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("quantization_method", "is_loaded_in_4bit"):
        if hasattr(model, attr):
            delattr(model, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Dequantize every 4-bit weight of ``model`` in place: a ``Linear4bit`` becomes an ``nn.Linear``; a LoRA layer
    over a 4-bit base keeps its adapters and gets the dequantized base (a frozen Parameter). ``dtype``: default the
    dtype each weight was quantized from. The values are bitsandbytes' dequantization (no re-quantization), so
    ``merge_lora`` afterwards gives ``dequant(W) + scaling·BA``: the function the adapters were trained on. Removes
    the Hugging Face quantization config so ``save_pretrained`` writes a plain checkpoint. Returns the module names
    changed (an error when there are none)."""
    changed = []
    for name, mod in list(model.named_modules()):
        w = getattr(mod, "weight", None)
        if not is_params4bit(w):
            continue
        prepare_linear4bit(mod)  # bitsandbytes' standard layout if its CPU inference path repacked it
        q = describe(mod.weight, f"{name}.weight")
        dense = nn.Parameter(dequantize(q, dtype), requires_grad=False)
        if _is_linear4bit(mod):
            new = nn.Linear(q.in_features, q.out_features, bias=mod.bias is not None, device="meta")
            new.weight, new.bias = dense, mod.bias
            new.train(mod.training)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        else:
            mod.weight = dense
        changed.append(name)
    if not changed:
        raise ValueError("dequantize_model found no 4-bit (bitsandbytes) weight in the model")
    _drop_hf_quantization(model)
    return changed


def _is_linear4bit(mod: nn.Module) -> bool:
    bnb = _require_bnb()
    return isinstance(mod, bnb.nn.Linear4bit)


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes of the 4-bit weights incl. their quant state, bytes of the same weights in bf16)`` of ``model``."""
    b4 = b16 = 0
    seen: set = set()
    for p in model.parameters():
        if is_params4bit(p) and p.data_ptr() not in seen:
            q = describe(p)
            b4 += q.nbytes(seen)
            b16 += q.shape[0] * q.shape[1] * 2
    return b4, b16
