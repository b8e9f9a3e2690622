"""Training-memory tools: activation checkpointing, a low-precision frozen base, and a memory report.

Where the memory of a LoRA fine-tune goes (``P`` base parameters, ``p`` LoRA parameters, ``T`` tokens per step,
``L`` layers, ``H`` hidden size, ``V`` vocabulary)::

    frozen base weights      P x 4 bytes (fp32) or P x 2 (bf16 via cast_frozen_params)
    LoRA weights + grads     p x (4 + 4)
    AdamW state              p x 8 (exp_avg, exp_avg_sq; always fp32 because the LoRA parameters are)
    activations              ~ T x L x (c_layer x H) x bytes   saved for backward; with checkpointing only the
                             T x H input of each layer plus one layer's worth during its recompute
    logits                   T x V x 4 x (2..3) with HF's loss; one [C, V] chunk with lora_kernels.training.losses

- :func:`enable_gradient_checkpointing` uses Hugging Face's own switch (non-reentrant) on HF models, or wraps any
  list of modules here. Non-reentrant ``torch.utils.checkpoint`` with ``preserve_rng_state=True`` saves the CPU (and
  CUDA) RNG state before each checkpointed forward and restores it for the recompute; the LoRA dropout seed is drawn
  from torch's CPU generator (``lora_kernels.backends.mask.draw_seed``), so the recompute draws the same seed, hence the same
  mask (tests/test_memory.py records both seeds and compares them).
- :func:`cast_frozen_params` stores the frozen (``requires_grad=False``) floating parameters in bf16 while the
  trainable ones (LoRA, ``modules_to_save``) stay fp32, so their gradients and optimizer state are fp32 too.
- :class:`PeakMemory` measures the peak (CUDA: ``max_memory_allocated``; CPU: resident set size sampled by a
  background thread, plus the process high-water mark) and :func:`memory_report` splits it up.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import threading

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_GIB = 1024**3
_MIB = 1024**2
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# ----------------------------------------------------------------------------------------------------------------
# Activation checkpointing


def _find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The repeated blocks: the model family's (lora_kernels.models.registry), else the usual attribute paths."""
    from ..models.registry import blocks_of

    return blocks_of(model)


_CKPT_CLASSES: dict[tuple[type, bool], type] = {}


def _checkpointed_class(cls: type, preserve_rng_state: bool) -> type:
    """A subclass of ``cls`` whose ``forward`` runs under non-reentrant ``checkpoint`` while training with grad.

    Swapping ``module.__class__`` (instead of wrapping the module) keeps ``state_dict`` keys, ``isinstance`` and
    ``copy.deepcopy`` intact; the forward hooks of ``__call__`` stay outside the checkpoint, so they run once.
    """
    key = (cls, preserve_rng_state)
    if key not in _CKPT_CLASSES:

        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled():
                return checkpoint(
                    cls.forward, self, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs
                )
            return cls.forward(self, *args, **kwargs)

        _CKPT_CLASSES[key] = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_lk_ckpt_base": cls})
    return _CKPT_CLASSES[key]


def checkpoint_modules(modules, *, preserve_rng_state: bool = True) -> int:
    """Checkpoint each module of ``modules`` (an iterable of ``nn.Module``); returns how many were wrapped."""
    n = 0
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules must contain nn.Module objects, got {type(m).__name__}")
        if hasattr(type(m), "_lk_ckpt_base"):
            continue
        m.__class__ = _checkpointed_class(type(m), preserve_rng_state)
        n += 1
    return n


def uncheckpoint_modules(modules) -> None:
    for m in modules:
        base = getattr(type(m), "_lk_ckpt_base", None)
        if base is not None:
            m.__class__ = base


def _hf_checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and hasattr(
        model, "gradient_checkpointing_enable"
    )


def enable_gradient_checkpointing(model: nn.Module, layers=None, *, preserve_rng_state: bool = True) -> str:
    """Non-reentrant activation checkpointing of the decoder layers. Returns a one-line description.

    Args:
        model: a Hugging Face ``PreTrainedModel`` (its own switch is used, with ``use_reentrant=False``) or any
            ``nn.Module``.
        layers: the modules to checkpoint (e.g. ``model.blocks``); required when ``model`` is not an HF model
            and has no recognisable ``layers`` list. Given explicitly, it is used even on HF models.
        preserve_rng_state: keep True for dropout (the recompute must draw the same masks).
    """
    if layers is None and _hf_checkpointing(model):
        kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False  # a KV cache is useless in training and HF warns about it
        return f"hf activation checkpointing (non-reentrant) on {type(model).__name__}"
    if layers is None:
        layers = _find_decoder_layers(model)
        if layers is None:
            raise ValueError(
                f"layers: {type(model).__name__} is not a Hugging Face model and has no model.layers / layers / "
                "transformer.h list; pass the modules to checkpoint explicitly"
            )
    n = checkpoint_modules(list(layers), preserve_rng_state=preserve_rng_state)
    return f"checkpointing {n} modules (non-reentrant)"


def disable_gradient_checkpointing(model: nn.Module, layers=None) -> None:
    if layers is None and _hf_checkpointing(model):
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
    uncheckpoint_modules(layers if layers is not None else model.modules())


# ----------------------------------------------------------------------------------------------------------------
# Low-precision frozen base


@dataclasses.dataclass
class CastReport:
    params: int  # number of parameter elements cast
    bytes_before: int
    bytes_after: int
    dtype: torch.dtype

    def __str__(self) -> str:
        return (
            f"frozen base -> {str(self.dtype).replace('torch.', '')}: {self.params / 1e6:.1f}M params, "
            f"{self.bytes_before / _MIB:.0f} MiB -> {self.bytes_after / _MIB:.0f} MiB"
        )


def cast_frozen_params(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> CastReport:
    """Store every frozen floating parameter of ``model`` in ``dtype``; trainable parameters are left untouched.

    Call it after LoRA is applied (which froze the base) and before the optimizer is built. The ``Parameter``
    objects are kept (only ``.data`` changes), so tied weights stay tied. Buffers (rotary ``inv_freq``…) keep their
    precision. The forward then runs in ``dtype`` (the embedding output is bf16); LoRA weights stay fp32 and are
    cast inside the fused op, as DESIGN.md specifies. Use autocast as well when trainable non-LoRA modules
    (``modules_to_save``) are fp32, so that their matmuls see one dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    seen: set[int] = set()
    n = before = after = 0
    for p in model.parameters():
        if id(p) in seen or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
            continue
        seen.add(id(p))
        before += p.numel() * p.element_size()
        p.data = p.data.to(dtype)
        after += p.numel() * p.element_size()
        n += p.numel()
    return CastReport(n, before, after, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def _rss_bytes() -> int:
    try:  # Linux: no dependency, ~10 us
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PeakMemory:
    """Peak memory over a ``with`` block (or between ``start()`` and ``stop()``).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory, exact).
    CPU: the resident set size, sampled every ``interval_s`` by a daemon thread (psutil), so that the peak of one
    phase can be told apart from earlier ones; the kernel's lifetime high-water mark (``ru_maxrss``) is kept as
    ``lifetime_peak``. RSS includes the interpreter and libraries: compare runs, or subtract ``baseline``.
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.005):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda max allocated" if self.device.type == "cuda" else "cpu peak RSS"

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _rss_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss_bytes())

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = self.peak = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="lk-peak-rss", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int:
        self.update()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.peak

    def update(self) -> int:
        """Fold the current value into the peak (call after a step; the sampler may miss a short spike)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = max(self.peak, _rss_bytes())
        return self.peak

    @property
    def lifetime_peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _ru_maxrss_bytes()

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _unique_params(model: nn.Module):
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


@dataclasses.dataclass
class MemoryReport:
    """Bytes, by purpose. ``activations`` is an estimate: the measured peak minus everything else that is known
    (the baseline when measuring started, gradients, optimizer state) — i.e. activations + temporaries."""

    frozen_weights: int
    trainable_weights: int
    grads: int
    optimizer_state: int
    peak: int
    peak_kind: str
    baseline: int
    activations: int
    dtypes: dict[str, int]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtypes"] = dict(self.dtypes)
        return d

    def __str__(self) -> str:
        return self.table()

    def table(self, include_peak: bool = True) -> str:
        """The breakdown as lines; ``include_peak=False`` leaves the peak row out where the caller reports the
        run's one peak figure itself (the SFT summary: the process high-water mark)."""

        def gb(x):
            return f"{x / _GIB:7.3f} GiB" if abs(x) >= _GIB else f"{x / _MIB:7.1f} MiB"

        rows = [
            ("frozen weights", self.frozen_weights),
            ("trainable weights", self.trainable_weights),
            ("gradients", self.grads),
            ("optimizer state", self.optimizer_state),
            ("activations + temporaries (est.)", self.activations),
        ]
        if include_peak:
            rows.append((f"peak ({self.peak_kind})", self.peak))
        dt = ", ".join(f"{k}: {v / 1e6:.1f}M" for k, v in sorted(self.dtypes.items()))
        lines = ["memory:"] + [f"  {name:<34} {gb(v)}" for name, v in rows] + [f"  parameter dtypes: {dt}"]
        return "\n".join(lines)


def memory_report(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, peak: PeakMemory | None = None
) -> MemoryReport:
    """Split the memory of a training run: weights (frozen / trainable), gradients, optimizer state, and the
    activation estimate ``peak - baseline - grads - optimizer state`` when ``peak`` (started before the first
    training step, i.e. after the model was loaded) is given. On CPU the baseline is the RSS at start, which
    already contains the weights; on CUDA it is the allocated memory at start (weights and anything else live).
    """
    frozen = trainable = 0
    dtypes: dict[str, int] = {}
    for p in _unique_params(model):
        b = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += b
        else:
            frozen += b
        key = str(p.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + p.numel()
    opt = optimizer_state_bytes(optimizer)
    grads = trainable  # a gradient per trainable parameter, same dtype: alive at the peak (the backward)
    if peak is not None:
        pk = peak.update()
        act = max(0, pk - peak.baseline - grads - opt)
        return MemoryReport(frozen, trainable, grads, opt, pk, peak.kind, peak.baseline, act, dtypes)
    return MemoryReport(frozen, trainable, grads, opt, 0, "not measured", 0, 0, dtypes)


def estimate_activation_bytes(
    config, tokens: int, *, dtype_bytes: int = 4, checkpointing: bool = False, chunked_ce: bool = False
) -> dict[str, int]:
    """A back-of-the-envelope count of what a Llama-style decoder saves for backward (for planning runs).

    Per layer and token, eager attention off (SDPA saves q, k, v, out and the log-sum-exp), the tensors autograd
    keeps are about ``10 H + 2 H_kv + 4 I`` elements (the two RMSNorm inputs, q/k/v after RoPE, the attention
    output, o_proj's input, gate/up outputs, the SiLU output and the product). With checkpointing each layer keeps
    only its ``H`` input and one layer at a time is rebuilt. Logits: HF's loss holds the ``[T, V]`` logits in the
    activation dtype, their fp32 upcast and the fp32 softmax gradient; the chunked loss holds ``dh`` (``T x H``)
    and one ``[C, V]`` chunk.
    """
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    hkv = h // heads * kv
    n_layers = config.num_hidden_layers
    v = config.vocab_size
    per_layer = tokens * (10 * h + 2 * hkv + 4 * inter) * dtype_bytes
    layers = tokens * h * dtype_bytes * n_layers + per_layer if checkpointing else per_layer * n_layers
    if chunked_ce:
        from .losses import auto_chunk_size

        logits = tokens * h * dtype_bytes + auto_chunk_size(tokens, h, v) * v * 4 * 2
    else:
        logits = tokens * v * (dtype_bytes + 4 + 4)
    return {"layers": int(layers), "logits": int(logits), "total": int(layers + logits)}
