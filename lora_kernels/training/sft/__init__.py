"""Supervised fine-tuning on top of lora_kernels: ``lora-kernels sft`` / ``python -m lora_kernels.training.sft``.

Modules: ``config`` (SFTConfig, YAML + command-line overrides), ``data`` (datasets, chat template, assistant-only
labels, packing), ``modeling`` (offline model loading), ``train`` (the loop), ``checkpoint`` (atomic checkpoints,
exact resume), ``export`` (PEFT adapter, merged HF folder).
"""

from .config import ConfigError, SFTConfig, build_config, config_from_argv

__all__ = ["ConfigError", "SFTConfig", "build_config", "config_from_argv", "run_sft"]


def run_sft(cfg, log=None):
    from .train import run_sft as _run

    return _run(cfg) if log is None else _run(cfg, log=log)
