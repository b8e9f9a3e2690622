"""The comparison's configuration: :data:`DEFAULT`, the presets, YAML files and command-line overrides.

Resolution order: ``DEFAULT`` <- task preset (:data:`PRESETS`) <- YAML file (``yaml.safe_load``) <- ``QUICK``
(with ``--quick``) <- command-line overrides. ``--data FILE`` (or ``data:`` in the YAML) makes the task ``file``.
Every problem is a :class:`ConfigError` naming the key and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from .train import TrainConfig

# Learning rates, chosen on a 30-step pilot (480 training articles, max_length 64; test accuracy in brackets):
# full fine-tuning at the usual BERT rate 1e-4 [0.94]; the subspace method trains r² numbers per layer behind an
# orthonormal frame and wants 1e-2 [3e-3: 0.62, 1e-2: 0.94, 3e-2: 0.89]; LoRA 2e-3 [1e-3: 0.83, 3e-3: 0.90];
# the head-only probe needs a high rate to move a fresh head in ~100 steps [3e-3: 0.30].
DEFAULT: dict = {
    "task": "bbc_news",  # bbc_news | synthetic | file (set by --data)
    "model": "minilm",  # minilm | tiny-bert | a local model directory
    "max_length": 128,
    "test_fraction": 0.2,
    "split_seed": 0,  # the train/test split; fixed across the seeds below
    "seeds": 3,  # every method runs with seeds train.seed, train.seed + 1, ...
    "train_examples": None,  # None = the whole training split (1,781 BBC articles)
    "test_examples": None,  # None = the whole test split (444 BBC articles)
    "threads": None,  # torch.set_num_threads; None = torch's default
    "device": "cpu",
    # --data FILE: JSONL or CSV (see files.py)
    "data": None,
    "data_format": "auto",  # auto (from the extension) | jsonl | csv
    "text_field": "text",
    "label_field": "label",
    "split_field": "split",
    "encoding": "utf-8",
    "train": {
        "epochs": 1,
        "batch_size": 16,
        "eval_batch_size": 64,
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": 0,  # the first seed
        "max_steps": None,  # None: epochs decide
    },
    "methods": [
        {"name": "full fine-tuning", "method": "full", "lr": 1e-4},
        {"name": "head only", "method": "head", "lr": 2e-2},
        {"name": "subspace r=32", "method": "subspace", "r": 32, "lora_alpha": 32, "lr": 1e-2},
        {"name": "LoRA r=4", "method": "lora", "r": 4, "lora_alpha": 8, "lr": 2e-3},
        {"name": "LoRA r=16", "method": "lora", "r": 16, "lora_alpha": 32, "lr": 2e-3},
    ],
}

# BBC News: the budget per seed is cut (from 128 tokens and a full epoch of 112 steps) so that 3 seeds x 5 methods
# stay under 15 minutes on the project's 2-core CPU: 64 tokens (title + first sentences), 80 steps (1,280 of the
# 1,781 training articles at batch 16).
BBC_NEWS: dict = {"max_length": 64, "train": {"max_steps": 80}}

# --quick: a smoke test of the whole path (2 steps per method, 2 seeds), not a measurement.
QUICK: dict = {
    "train_examples": 20,
    "test_examples": 10,
    "max_length": 32,
    "seeds": 2,
    "train": {"epochs": 1, "batch_size": 10},
}

# The synthetic task on a 1-layer random BERT (init std 0.2: with the usual 0.02 the random features carry too
# little of the keyword for anything but full fine-tuning to find in a few dozen steps).
SYNTHETIC: dict = {
    "model": "tiny-bert",
    "train_examples": 256,
    "test_examples": 128,
    "max_length": 8,
    "train": {"epochs": 8, "batch_size": 32},
    # A randomly initialised model has nothing to preserve: every method takes a high rate.
    "methods": [
        {"name": "full fine-tuning", "method": "full", "lr": 3e-3},
        {"name": "head only", "method": "head", "lr": 1e-2},
        {"name": "subspace r=8", "method": "subspace", "r": 8, "lora_alpha": 8, "lr": 3e-2},
        {"name": "LoRA r=2", "method": "lora", "r": 2, "lora_alpha": 4, "lr": 1e-2},
        {"name": "LoRA r=8", "method": "lora", "r": 8, "lora_alpha": 16, "lr": 1e-2},
    ],
}
PRESETS = {"bbc_news": BBC_NEWS, "synthetic": SYNTHETIC, "file": {}}
TASKS = tuple(PRESETS)


class ConfigError(ValueError):
    """A configuration value (YAML key or command-line option) is unknown or out of range."""


def merge(base: dict, override: dict | None) -> dict:
    """Recursive dict update (lists are replaced, not merged); unknown keys are an error naming the key."""
    out = copy.deepcopy(base)
    for key, val in (override or {}).items():
        if key not in out:
            raise KeyError(f"unknown config key {key!r}; known: {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(val, dict):
            out[key] = merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def _merge(base: dict, override: dict | None, where: str) -> dict:
    try:
        return merge(base, override)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None


def _positive_int(cfg: dict, key: str, least: int = 1) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ConfigError(f"{key} must be an integer >= {least}, got {v!r}")


def validate(cfg: dict) -> dict:
    """Check the top-level values (each method's training values are checked by :class:`TrainConfig`)."""
    if cfg["task"] not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {cfg['task']!r}")
    if cfg["task"] == "file" and not cfg["data"]:
        raise ConfigError("task 'file' needs a data file (--data FILE)")
    _positive_int(cfg, "seeds")
    _positive_int(cfg, "max_length", least=2)
    tf = cfg["test_fraction"]
    if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0.0 < tf < 1.0:
        raise ConfigError(f"test_fraction must be a number in (0, 1), got {tf!r}")
    for key in ("train_examples", "test_examples"):
        if cfg[key] is not None:
            _positive_int(cfg, key)
    if not isinstance(cfg["methods"], list) or not cfg["methods"]:
        raise ConfigError(f"methods must be a non-empty list, got {cfg['methods']!r}")
    method_configs(cfg)
    return cfg


def _read_yaml(path: str | Path) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(loaded).__name__}")
    return loaded


def load_config(
    path: str | Path | None = None, quick: bool = False, task: str | None = None, overrides: dict | None = None
) -> dict:
    """DEFAULT <- task preset <- YAML file <- QUICK <- ``overrides`` (command-line values), validated.

    The task: ``file`` when a data file is given (command line or YAML), else ``task``, the YAML's, or bbc_news."""
    loaded = _read_yaml(path) if path is not None else {}
    overrides = overrides or {}
    data = overrides.get("data", loaded.get("data"))
    if data and task not in (None, "file"):
        raise ConfigError(f"--data and --task {task}: give one of them")
    chosen = "file" if data else (task or loaded.get("task") or DEFAULT["task"])
    if chosen not in PRESETS:
        raise ConfigError(f"task must be one of {TASKS}, got {chosen!r}")
    cfg = _merge(merge(DEFAULT, PRESETS[chosen]), loaded, f"config {path}")
    cfg["task"] = chosen
    if quick:
        cfg = merge(cfg, QUICK)
    return validate(_merge(cfg, overrides, "command line"))


def method_configs(cfg: dict) -> list[tuple[str, TrainConfig]]:
    """``(name, TrainConfig)`` per entry of ``cfg["methods"]``, with the shared ``cfg["train"]`` budget."""
    out = []
    names = set()
    for i, entry in enumerate(cfg["methods"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"methods[{i}] must be a mapping (name, method, lr, ...), got {entry!r}")
        entry = dict(entry)
        name = entry.pop("name", None) or f"method {i}"
        if name in names:
            raise ConfigError(f"methods[{i}]: duplicate name {name!r}")
        names.add(name)
        try:
            out.append((name, TrainConfig(**{**cfg["train"], **entry})))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"methods[{i}] ({name!r}): {e}") from None
    return out


def select(methods: list[tuple[str, TrainConfig]], only: list[str] | None) -> list[tuple[str, TrainConfig]]:
    """The methods named in ``only`` (all when None), in config order."""
    if not only:
        return methods
    unknown = sorted(set(only) - {n for n, _ in methods})
    if unknown:
        raise ConfigError(f"--methods names {unknown} not in the config's {[n for n, _ in methods]}")
    return [(n, c) for n, c in methods if n in only]


def with_seed(tcfg: TrainConfig, seed: int) -> TrainConfig:
    return dataclasses.replace(tcfg, seed=seed)
