"""Models: the family table keyed on ``config.model_type`` (``registry``), where models come from (``sources``:
named offline sources from PyPI packages and local folders), and tiny random models for tests (``tiny``).
Needs the ``hf`` extra (transformers, gguf) to load anything; importing this package imports neither.
"""

from .registry import FAMILIES, ModelFamily, blocks_of, family_of, register_family
from .sources import (
    ModelError,
    load_causal_lm,
    load_classifier,
    load_smollm2,
    load_tokenizer,
    minilm_dir,
    smollm2_gguf_path,
)
from .tiny import byte_tokenizer, save_tiny_random, tiny_bert, tiny_llama, tiny_random

__all__ = [
    "FAMILIES",
    "ModelError",
    "ModelFamily",
    "blocks_of",
    "byte_tokenizer",
    "family_of",
    "load_causal_lm",
    "load_classifier",
    "load_smollm2",
    "load_tokenizer",
    "minilm_dir",
    "register_family",
    "save_tiny_random",
    "smollm2_gguf_path",
    "tiny_bert",
    "tiny_llama",
    "tiny_random",
]
