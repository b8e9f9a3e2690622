"""Exports at the end of a run, each written to a temp folder and renamed into place.

* ``adapter/``: the LoRA adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``), loadable
  with ``peft.PeftModel.from_pretrained(base, "<run_dir>/adapter")`` on the same base model.
* ``merged/`` (``--merge``): a plain Hugging Face model folder (``save_pretrained``, safetensors) with the LoRA
  deltas folded into the base weights, plus the tokenizer; reloads with ``AutoModelForCausalLM.from_pretrained``.
  A 4-bit base (``--base_dtype nf4|fp4``) is dequantized first (``quant.convert.dequantize_model``: the values
  training saw) and the adapters are folded in without re-quantizing: a full-precision model in the dtype the
  base was quantized from, without bitsandbytes (the QLoRA recipe; ``merge_lora`` alone re-quantizes, like PEFT).
* ``model/`` (method ``full``): the fine-tuned model itself, same format as ``merged/``.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path


def _atomic_dir(final: Path, write) -> Path:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.parent / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def export_adapter(model, directory: Path, base_model_name_or_path: str | None = None) -> Path:
    from lora_kernels.adapters.io import save_adapter

    return _atomic_dir(
        Path(directory), lambda d: save_adapter(model, d, base_model_name_or_path=base_model_name_or_path)
    )


def save_hf_folder(model, tokenizer, directory: Path) -> Path:
    """``save_pretrained`` (safetensors) + tokenizer, with ``use_cache`` restored for inference."""

    def write(d: Path):
        use_cache = model.config.use_cache
        model.config.use_cache = True
        try:
            model.save_pretrained(d, safe_serialization=True)
        finally:
            model.config.use_cache = use_cache
        if tokenizer is not None:
            tokenizer.save_pretrained(d)

    return _atomic_dir(Path(directory), write)


def export_merged(model, tokenizer, directory: Path) -> Path:
    """Merge a copy of the LoRA model (the training model is left as is) and save it as a plain HF folder."""
    from lora_kernels.adapters.inject import merge_lora
    from lora_kernels.quant import is_params4bit

    merged = copy.deepcopy(model).to("cpu")
    if any(is_params4bit(p) for p in merged.parameters()):
        from lora_kernels.quant.convert import dequantize_model

        dequantize_model(merged)
    merged = merge_lora(merged)
    return save_hf_folder(merged, tokenizer, directory)
