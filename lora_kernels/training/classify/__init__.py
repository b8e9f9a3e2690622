"""Sequence classification: data (BBC News, synthetic), the fine-tuning loop, and the method comparison.

Entry point: ``lora-kernels compare [--quick]`` or ``python -m lora_kernels compare`` (see :mod:`lora_kernels.training.classify.cli`).
Nothing heavy is imported here; transformers loads only when a model is built.
"""

from .data import BBC_TOPICS, EncodedDataset, TextDataset, load_bbc_news, stratified_split, synthetic_task
from .train import METHODS, RunResult, TrainConfig, accuracy_and_macro_f1, evaluate, prepare_model, run, train

__all__ = [
    "BBC_TOPICS",
    "EncodedDataset",
    "METHODS",
    "RunResult",
    "TextDataset",
    "TrainConfig",
    "accuracy_and_macro_f1",
    "evaluate",
    "load_bbc_news",
    "prepare_model",
    "run",
    "stratified_split",
    "synthetic_task",
    "train",
]
