"""Sequence-classification fine-tuning: one loop for full fine-tuning, a head-only probe, LoRA and the subspace method.

The model is any ``AutoModelForSequenceClassification`` (encoder such as BERT/MiniLM, or decoder such as Llama,
whose head reads the last non-pad token). The method decides what trains:

=========  ===========================================================================================
full       every parameter (the reference: most memory, most trainable parameters)
head       only the classification head (a linear probe of the frozen encoder)
lora       ``lora_kernels.adapters.inject.apply_lora`` on the target linears; head trainable (``modules_to_save``)
subspace   ``lora_kernels.nn.subspace.apply_subspace``: frozen top-r singular vectors, trainable ``r x r``;
           head trainable (``modules_to_save``)
=========  ===========================================================================================

Every method sees the same examples in the same order (:func:`lora_kernels.training.classify.data.batches` is seeded
by ``(seed, epoch)``), the same number of optimiser steps and the same schedule (AdamW, linear warm-up then linear
decay, gradient clipping); only the learning rate is per method, as is usual (adapters take ~10-100x the
full fine-tuning rate).

Measured per run: trainable parameters, peak memory during training above the memory held before it (CUDA:
``max_memory_allocated``; CPU: resident set size sampled every 2 ms after returning freed heap to the OS),
training wall time, tokens/s (real, unpadded tokens / training time), test accuracy and macro-F1.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from .data import EncodedDataset, batches

METHODS = ("full", "head", "lora", "subspace")
HEAD_NAMES = ("pre_classifier", "classifier", "score")  # HF seq-cls heads: BERT/DistilBERT/RoBERTa, decoders


@dataclass
class TrainConfig:
    """One fine-tuning run. ``r``/``lora_alpha``/``target_modules`` matter only to ``lora`` and ``subspace``."""

    method: str = "lora"
    lr: float = 1e-3
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: str | list[str] = "all-linear"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("r", "epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be None or a positive int, got {self.max_steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite float, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


@dataclass
class RunResult:
    name: str
    method: str
    r: int | None
    trainable_params: int
    total_params: int
    peak_mem_mib: float
    train_time_s: float
    cpu_time_s: float
    tokens_per_s: float
    accuracy: float
    macro_f1: float
    steps: int
    final_loss: float
    seed: int = 0  # the run's seed: head/adapter init, dropout, data order
    tokens: int = 0  # unpadded training tokens seen
    losses: list[float] = field(default_factory=list, repr=False)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    def row(self) -> dict:
        d = asdict(self)
        d.pop("losses")
        d["trainable_pct"] = self.trainable_pct
        return d


# ---------------------------------------------------------------------------------------------------- metrics


def accuracy_and_macro_f1(pred: list[int], gold: list[int], num_labels: int) -> tuple[float, float]:
    """Accuracy and the unweighted mean over all ``num_labels`` classes of F1 (a class never predicted nor present
    scores 0, which is what scikit-learn's ``zero_division=0`` does)."""
    if len(pred) != len(gold):
        raise ValueError(f"pred and gold must have the same length, got {len(pred)} and {len(gold)}")
    if not gold:
        raise ValueError("gold must not be empty")
    acc = sum(int(p == g) for p, g in zip(pred, gold)) / len(gold)
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for p, g in zip(pred, gold) if p == c and g == c)
        fp = sum(1 for p, g in zip(pred, gold) if p == c and g != c)
        fn = sum(1 for p, g in zip(pred, gold) if p != c and g == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return acc, sum(f1s) / num_labels


# ---------------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _trim_heap() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, hiding the next run's real peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the level at ``__enter__``, in bytes, for the device the run uses."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._base = _rss_bytes()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak = self._max - self._base


# ---------------------------------------------------------------------------------------------------- methods


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the classification head's top-level modules (``classifier``, ``score``, ...)."""
    names = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)]
    if not names:
        raise ValueError(
            f"model {type(model).__name__} has none of the sequence-classification heads {HEAD_NAMES}; "
            "load it with AutoModelForSequenceClassification"
        )
    return names


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Apply ``cfg.method`` in place: set what trains, inject adapters. Returns the model."""
    heads = head_module_names(model)
    if cfg.method == "full":
        model.requires_grad_(True)
    elif cfg.method == "head":
        model.requires_grad_(False)
        for n in heads:
            getattr(model, n).requires_grad_(True)
    else:
        kwargs = dict(
            target_modules=cfg.target_modules,
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            exclude_modules=heads,
            modules_to_save=heads,
            backend=cfg.backend,
        )
        if cfg.method == "lora":
            from ...adapters.inject import apply_lora

            apply_lora(model, **kwargs)
        else:
            from ...adapters.subspace import apply_subspace

            apply_subspace(model, **kwargs)
    return model


# ---------------------------------------------------------------------------------------------------- loop


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def num_steps(n_examples: int, cfg: TrainConfig) -> int:
    steps = cfg.epochs * math.ceil(n_examples / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def train(model: torch.nn.Module, data: EncodedDataset, cfg: TrainConfig, device="cpu", log_every: int = 0) -> dict:
    """Fine-tune ``model`` (already prepared) on ``data``. Returns steps, losses, time, tokens, peak memory."""
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: call prepare_model first")
    total = num_steps(len(data), cfg)
    warm = int(cfg.warmup_ratio * total)

    def lr_at(step: int) -> float:  # linear warm-up to 1, then linear decay to 0 at the last step
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    tokens = 0
    step = 0
    with PeakMemory(device) as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        for epoch in range(cfg.epochs):
            for batch in batches(data, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch):
                if step >= total:
                    break
                batch = _to(batch, device)
                loss = model(**batch).loss
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                tokens += int(batch["attention_mask"].sum())
                step += 1
                if log_every and step % log_every == 0:
                    print(f"  step {step}/{total} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
    del opt  # optimizer state is part of the run, not of the next one
    return {
        "steps": step,
        "losses": losses,
        "time_s": elapsed,
        "cpu_time_s": cpu,
        "tokens": tokens,
        "peak_mem_bytes": mem.peak,
    }


@torch.no_grad()
def predict(model: torch.nn.Module, data: EncodedDataset, batch_size: int = 64, device="cpu") -> list[int]:
    model.eval()
    preds: list[int] = []
    for batch in batches(data, batch_size, shuffle=False):
        batch = _to(batch, torch.device(device))
        batch.pop("labels")
        preds += model(**batch).logits.argmax(-1).tolist()
    return preds


def evaluate(model: torch.nn.Module, data: EncodedDataset, batch_size: int = 64, device="cpu") -> tuple[float, float]:
    """``(accuracy, macro_f1)`` on ``data``."""
    return accuracy_and_macro_f1(predict(model, data, batch_size, device), data.labels, len(data.label_names))


def run(
    name: str,
    build_model,
    train_data: EncodedDataset,
    test_data: EncodedDataset,
    cfg: TrainConfig,
    device="cpu",
    log_every: int = 0,
) -> RunResult:
    """Seed, build a fresh model with ``build_model()``, apply the method, train, evaluate."""
    torch.manual_seed(cfg.seed)  # per seed, the same head (and adapter) initialisation and dropout for every method
    model = build_model().to(device)
    total_params = count_params(model)  # the base model: the same denominator for every method
    prepare_model(model, cfg)
    trainable = count_params(model, trainable_only=True)
    stats = train(model, train_data, cfg, device, log_every)
    acc, f1 = evaluate(model, test_data, cfg.eval_batch_size, device)
    losses = stats["losses"]
    tail = losses[-max(1, len(losses) // 10) :]
    return RunResult(
        name=name,
        method=cfg.method,
        r=cfg.r if cfg.method in ("lora", "subspace") else None,
        trainable_params=trainable,
        total_params=total_params,
        peak_mem_mib=stats["peak_mem_bytes"] / 2**20,
        train_time_s=stats["time_s"],
        cpu_time_s=stats["cpu_time_s"],
        tokens_per_s=stats["tokens"] / max(stats["time_s"], 1e-9),
        accuracy=acc,
        macro_f1=f1,
        steps=stats["steps"],
        final_loss=sum(tail) / len(tail),
        seed=cfg.seed,
        tokens=stats["tokens"],
        losses=losses,
    )
