"""Supervised fine-tuning on top of lora_kernels: ``lora-kernels sft`` (or ``python -m lora_kernels sft``).

Modules: ``config`` (SFTConfig, YAML + command-line overrides), ``data`` (datasets, chat template, assistant-only
labels, packing), ``loop`` (``run_sft``: the run from start to summary), ``runtime`` (device, precision, method,
placement, optimizer), ``sampler`` (rows per step), ``evaluation`` (loss, eval, generation), ``metrics``
(metrics.jsonl, plot, summary), ``resume`` + ``checkpoint`` (atomic checkpoints, exact resume), ``export`` (PEFT
adapter, merged HF folder). Models load through :mod:`lora_kernels.models`.
"""

from .config import ConfigError, SFTConfig, build_config, config_from_argv

__all__ = ["ConfigError", "SFTConfig", "build_config", "config_from_argv", "run_sft"]


def run_sft(cfg, log=None):
    from .loop import run_sft as _run

    return _run(cfg) if log is None else _run(cfg, log=log)
