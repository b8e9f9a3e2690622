"""Sequence classification: data (BBC News, the user's JSONL/CSV, synthetic), the fine-tuning loop, and the method
comparison over several seeds.

Entry point: ``lora-kernels compare [--quick] [--data FILE] [--seeds N]`` or ``python -m lora_kernels compare``
(see :mod:`lora_kernels.training.classify.cli`). Modules: ``data`` (datasets, split, batches), ``files`` (JSONL/CSV
reading and checking), ``task`` (encoded data + model factory), ``train`` (the loop), ``config``, ``compare`` (the
runs), ``stats`` (mean ± std, paired differences), ``report`` and ``chart`` (artefacts).
Nothing heavy is imported here; transformers loads only when a model is built.
"""

from .data import BBC_TOPICS, EncodedDataset, TextDataset, load_bbc_news, stratified_split, synthetic_task
from .files import DataFileError, LabelledFile, load_labelled_file
from .train import METHODS, RunResult, TrainConfig, accuracy_and_macro_f1, evaluate, prepare_model, run, train

__all__ = [
    "BBC_TOPICS",
    "DataFileError",
    "EncodedDataset",
    "LabelledFile",
    "METHODS",
    "RunResult",
    "TextDataset",
    "TrainConfig",
    "accuracy_and_macro_f1",
    "evaluate",
    "load_bbc_news",
    "load_labelled_file",
    "prepare_model",
    "run",
    "stratified_split",
    "synthetic_task",
    "train",
]
