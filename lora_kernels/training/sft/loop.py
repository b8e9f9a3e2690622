"""The SFT loop: ``run_sft(cfg)`` fine-tunes a causal LM with LoRA (our ``LoRALinear``) or full fine-tuning.

Order of work, so that every bad input fails before any training starts::

    validate config -> check run folder / resume checkpoint (manifest, sha256, config fingerprint)   resume.py
    -> seeds -> model + tokenizer (lora_kernels.models) -> data (DataError) -> the method: LoRA injection
    (target modules must exist) -> placement + optimizer (AdamW, decay / no-decay groups) + warmup-cosine
    schedule (runtime.py) -> restore checkpoint -> eval + samples "before" (evaluation.py)
    -> train steps (sampler.py; eval / checkpoint every N) -> eval + samples "after"
    -> adapter / merged / full-model export (export.py), loss.png, summary.json (metrics.py)

Loss normalisation: every optimizer step sums the token cross-entropy over all micro-batches and divides by the
number of target tokens of the *whole* step, so ``grad_accum=k, batch_size=b`` computes the same gradient as
``grad_accum=1, batch_size=k*b`` (up to summation order), and packed and padded batches of the same examples give
the same loss.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_kernels.training import distributed as dist_utils

from . import resume as resume_mod
from .config import QUANT_BASE_DTYPES, ConfigError, SFTConfig, dump_yaml
from .data import SFTData, check_dataset_spec, collate, packed_mask_kind, prepare_data
from .evaluation import compute_loss_sum, evaluate, generate_samples, to_device
from .metrics import MetricsLog, build_summary, plot_losses, print_summary, setup_line
from .runtime import (
    adamw_impl,
    apply_method,
    autocast_ctx,
    backend_label,
    is_main_process,
    load_dtype,
    lr_lambda,
    param_groups,
    resolve_device,
    resolve_precision,
    resolve_strategy,
    seed_everything,
    wrap_model,
)
from .sampler import StepSampler, row_lengths

# Test hook (tests/test_sft_train.py): after logging this step, sleep so the test can SIGKILL a run mid-way at a
# known point. Read once at import; unset in normal use.
_PAUSE_AT_STEP = os.environ.get("LORA_KERNELS_SFT_PAUSE_AT_STEP")


@dataclass
class Run:
    """Everything one run holds (set up by :func:`_setup`, advanced by :func:`_train_step`)."""

    cfg: SFTConfig
    log: object
    strategy: str
    world: int
    main: bool
    own_group: bool
    t_start: float
    run_dir: Path = None
    resume_path: Path | None = None
    device: torch.device = None
    amp_dtype: torch.dtype | None = None
    model: object = None  # what the step calls (maybe a DDP / FSDP wrapper)
    core: object = None  # the Hugging Face model itself
    tokenizer: object = None
    data: SFTData = None
    sampler: StepSampler = None
    counts: dict = field(default_factory=dict)
    optimizer: object = None
    scheduler: object = None
    trainable: list = field(default_factory=list)
    total_steps: int = 0
    rows_per_step: int = 0
    mask_kind: str = "additive"
    metrics: MetricsLog | None = None
    start_step: int = 0
    history: dict = field(default_factory=dict)
    train_time: float = 0.0
    train_tokens: int = 0
    train_cpu: float = 0.0
    eval_time: float = 0.0

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def evaluate(self) -> dict:
        t0 = time.time()
        out = evaluate(self.model, self.data.eval_rows, self.cfg, self.pad_id, self.device, self.amp_dtype,
                       core=self.core, direct=self.strategy != "fsdp")  # fmt: skip
        self.eval_time += time.time() - t0
        return out


def _print_flush(*args) -> None:
    print(*args, flush=True)


def _start(cfg: SFTConfig, log) -> Run:
    """Validation, the process group, the run folder and resume checkpoint, device, threads, seeds."""
    cfg.validate()
    t_start = time.time()
    strategy = resolve_strategy(cfg)
    own_group = strategy != "none" and not dist_utils.is_distributed()
    if strategy != "none":
        dist_utils.init_distributed(device=None if cfg.device == "auto" else torch.device(cfg.device).type)
    main = is_main_process()
    run = Run(cfg, log if main else (lambda *a, **k: None), strategy, dist_utils.get_world_size(), main, own_group,
              t_start)  # fmt: skip
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tensorboard: true needs the 'tensorboard' package (pip install tensorboard)") from None
    run.run_dir, run.resume_path, resume_state = resume_mod.prepare_run_dir(cfg, run.log)
    dist_utils.barrier()
    check_dataset_spec(cfg.dataset)
    run.device = resolve_device(cfg)
    run.amp_dtype = resolve_precision(cfg, run.device)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    run.history["_resume_state"] = resume_state
    return run


def _setup(run: Run) -> None:
    """Model, data, sampler, method, placement, optimizer and schedule, then the checkpoint when resuming."""
    cfg, log = run.cfg, run.log
    from ...models import load_causal_lm

    t0 = time.time()
    model, run.tokenizer = load_causal_lm(cfg.model, dtype=load_dtype(cfg, run.device))
    if cfg.base_dtype in QUANT_BASE_DTYPES:  # QLoRA: the frozen linear layers in 4-bit, by bitsandbytes' quantizer
        from ...quant.convert import quantize_model

        log(str(quantize_model(model, cfg.base_dtype)))
    log(f"model {cfg.model}: {type(model).__name__} loaded in {time.time() - t0:.1f} s")
    run.data = prepare_data(cfg, run.tokenizer, log=log)
    st = run.data.stats
    log(
        f"data {cfg.dataset}: {st.n_conversations} conversations -> {st.n_train} train / {st.n_eval} eval examples, "
        f"{st.n_train_rows} train rows{' (packed)' if cfg.packing else ''}; truncated to max_len={cfg.max_len}: "
        f"{st.n_truncated}; dropped (no assistant token left): {st.n_dropped_no_target}; longest: {st.max_example_len}"
    )
    run.mask_kind = _packing_mask_kind(model) if cfg.packing else "additive"
    run.rows_per_step = cfg.batch_size * cfg.grad_accum * run.world  # global: each rank takes its slice
    run.sampler = StepSampler(len(run.data.train_rows), run.rows_per_step, cfg.seed, row_lengths(run.data, cfg))
    if run.sampler.steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size * grad_accum{' * world_size' if run.world > 1 else ''} = {run.rows_per_step} rows per step, "
            f"but the training set has only {len(run.data.train_rows)} rows"
            + (" (after packing: try --no-packing or a smaller --batch_size)" if cfg.packing else "")
        )
    run.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * run.sampler.steps_per_epoch))
    run.counts = apply_method(model, cfg)
    run.model, run.core = wrap_model(model, cfg, run.device)  # the optimizer after wrapping (FSDP2 swaps params)
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(
        param_groups(run.model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        **adamw_impl(run.device, run.strategy),
    )
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_lambda(cfg, run.total_steps))
    log(setup_line(run, run.counts, backend_label(cfg.backend, run.device)))
    resume_state = run.history.pop("_resume_state")
    if run.resume_path is not None:
        resume_mod.restore(run, run.resume_path, resume_state)
        log(f"resumed from {run.resume_path} at step {run.start_step}/{run.total_steps}")
    run.train_time = run.history.get("train_time_s", 0.0)
    run.train_tokens = run.history.get("train_tokens", 0)
    run.train_cpu = run.history.get("train_cpu_s", 0.0)


def _packing_mask_kind(model) -> str:
    """Packing keeps examples apart only for families whose attention honours the 4-D mask and position ids."""
    from ...models import family_of

    fam = family_of(model)
    if not fam.packing:
        raise ConfigError(
            f"packing: the model family {fam.model_type!r} is not verified to keep packed examples apart "
            "(lora_kernels.models.FAMILIES lists those that are); set packing: false, or register the family "
            "with packing=True once a test shows it"
        )
    return packed_mask_kind(model)


def _begin(run: Run) -> None:
    """Write the config, open the metrics log, and (on a fresh run) evaluate and sample "before"."""
    cfg = run.cfg
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run.run_dir / "config.yaml")
        run.metrics = MetricsLog(
            run.run_dir / "metrics.jsonl",
            run.start_step if run.resume_path is not None else None,
            run.run_dir / "tensorboard" if cfg.tensorboard else None,
        )
    if run.resume_path is not None:
        return
    before = run.evaluate()
    if before:
        run.log(f"eval before training: loss {before['eval_loss']:.4f}, ppl {before['eval_ppl']:.2f}")
        if run.metrics:
            run.metrics.write({"type": "eval", "step": 0, **before})
    samples = generate_samples(run.core, run.tokenizer, cfg, run.device, run.amp_dtype)
    run.history = {"eval_before": before, "samples_before": samples, "train_time_s": 0.0, "train_tokens": 0}
    for s in samples:
        run.log(f"  [before] {s['prompt']!r} -> {s['reply']!r}")


def _train_step(run: Run, step: int) -> dict:
    """One optimizer step over the global batch of ``step``; returns its metrics record."""
    cfg = run.cfg
    t_step, cpu_step = time.time(), time.process_time()
    epoch, row_ids = run.sampler.rows(step)
    rows = [run.data.train_rows[i] for i in row_ids][dist_utils.shard_slice(len(row_ids))]
    micro = [collate(rows[i : i + cfg.batch_size], run.pad_id, run.mask_kind) for i in range(0, len(rows), cfg.batch_size)]  # fmt: skip
    # Divide by the global target count (x world: DDP averages the ranks' gradients): every rank then
    # contributes its share of the single-process gradient of the whole global batch.
    n_targets = int(dist_utils.all_reduce_sum(sum(mb["n_targets"] for mb in micro)).item())
    divisor = n_targets / run.world
    n_tokens = int(dist_utils.all_reduce_sum(sum(len(ex) for row in rows for ex in row)).item())
    loss_sum = 0.0
    for i, mb in enumerate(micro):
        mb = to_device(mb, run.device)
        with dist_utils.no_sync(run.model, skip=i < len(micro) - 1):
            with autocast_ctx(run.device, run.amp_dtype):
                ls = compute_loss_sum(run.model, mb)
            (ls / divisor).backward()
        loss_sum += float(ls.detach())
    loss_sum = float(dist_utils.all_reduce_sum(loss_sum).item())
    if cfg.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.trainable if p.grad is not None])
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP2
    lr_now = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    dt, cpu_dt = time.time() - t_step, time.process_time() - cpu_step
    run.train_time += dt
    run.train_cpu += cpu_dt
    run.train_tokens += n_tokens
    loss = loss_sum / n_targets
    if not math.isfinite(loss):
        raise FloatingPointError(f"step {step + 1}: loss is {loss}; stopping (lower lr, or check the data)")
    # cpu_s: process CPU seconds (all threads): on a shared, oversubscribed machine tokens / cpu_s is the figure
    # that still compares across runs when wall-clock tokens/s does not
    return {"type": "train", "step": step + 1, "epoch": epoch, "loss": loss, "lr": lr_now, "grad_norm": grad_norm,
            "tokens": n_tokens, "target_tokens": n_targets, "tokens_per_s": n_tokens / dt, "step_time_s": dt,
            "cpu_s": cpu_dt}  # fmt: skip


def _train(run: Run):
    """The steps from ``start_step`` to ``total_steps``, with logging, periodic eval and checkpoints."""
    cfg = run.cfg
    from tqdm.auto import tqdm

    from lora_kernels.training.memory import PeakMemory

    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="sft", dynamic_ncols=True,
               disable=not (cfg.progress and run.main))  # fmt: skip
    say = bar.write if not bar.disable else run.log
    peak = PeakMemory(run.device).start()  # after loading: the baseline holds the weights
    run.model.train()
    for step in range(run.start_step, run.total_steps):
        rec = _train_step(run, step)
        peak.update()
        if step == run.start_step:
            run.history.setdefault("first_step_s", round(rec["step_time_s"], 2))
        if run.metrics:
            run.metrics.write(rec)
        if _PAUSE_AT_STEP is not None and step + 1 == int(_PAUSE_AT_STEP):
            time.sleep(3600)  # test hook: hold here so a test can SIGKILL the process at a known step
        bar.update(1)
        if (step + 1) % cfg.log_every == 0:
            tok_s = run.train_tokens / run.train_time
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tok_s:.0f}")
            if bar.disable and run.main:  # no progress bar (e.g. logs to a file): one line per log_every steps
                run.log(f"step {step + 1}/{run.total_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                        f"tokens/s {tok_s:.0f}")  # fmt: skip
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 != run.total_steps:
            ev = run.evaluate()
            if ev:
                say(f"step {step + 1}: eval loss {ev['eval_loss']:.4f}, ppl {ev['eval_ppl']:.2f}")
                if run.metrics:
                    run.metrics.write({"type": "eval", "step": step + 1, **ev})
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            resume_mod.save(run, step + 1, rec["epoch"])
    bar.close()
    peak.stop()
    return peak


def _export(run: Run) -> dict:
    """Adapter (PEFT format) / merged / full model, and the loss plot; rank 0 writes."""
    cfg, outputs, export_core = run.cfg, {}, run.core
    if run.strategy == "fsdp":  # sharded weights: rebuild an unsharded model on rank 0 from the gathered state
        full_sd, _ = dist_utils.full_state_dicts(run.model, trainable_only=cfg.method == "lora")  # collective
        if run.main:
            from ...models import load_causal_lm
            from .checkpoint import load_trainable_into

            export_core, _ = load_causal_lm(cfg.model)
            apply_method(export_core, cfg)
            load_trainable_into(export_core, full_sd, run.run_dir)
    if not run.main:
        return outputs
    from .export import export_adapter, export_merged, save_hf_folder

    if cfg.method == "lora":
        base = _base_name(cfg, export_core)
        outputs["adapter"] = str(export_adapter(export_core, run.run_dir / "adapter", base_model_name_or_path=base))
        if cfg.merge:
            outputs["merged"] = str(export_merged(export_core, run.tokenizer, run.run_dir / "merged"))
    else:
        outputs["model"] = str(save_hf_folder(export_core, run.tokenizer, run.run_dir / "model"))
        if cfg.merge:
            run.log("note: --merge has nothing to merge with method=full; the model is in model/")
    if run.metrics and cfg.plot and plot_losses(run.metrics.records(), run.run_dir / "loss.png", run.log):
        outputs["loss_plot"] = str(run.run_dir / "loss.png")
    return outputs


def _base_name(cfg: SFTConfig, model) -> str:
    """What the adapter records as its base: a path that exists here (the GGUF file of the built-in SmolLM2, the
    model folder given), so PEFT code that follows ``base_model_name_or_path`` never reaches for a hub."""
    if cfg.model == "smollm2":
        return model.config.name_or_path
    return str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model


def run_sft(cfg: SFTConfig, log=_print_flush) -> dict:
    """Run one SFT job as configured; returns the summary dict (also written to ``<run_dir>/summary.json``)."""
    run = _start(cfg, log)
    _setup(run)
    _begin(run)
    peak = _train(run)
    from lora_kernels.training.memory import memory_report

    mem = memory_report(run.core, run.optimizer, peak)
    after = run.evaluate()
    if after and run.metrics:
        run.metrics.write({"type": "eval", "step": run.total_steps, **after})
    samples_after = generate_samples(run.core, run.tokenizer, cfg, run.device, run.amp_dtype)
    outputs = _export(run)
    summary = build_summary(run, after, samples_after, outputs, mem)
    if run.main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if run.metrics:
            run.metrics.close()
    print_summary(summary, run.log)
    run.log(mem.table(include_peak=False))
    dist_utils.barrier()
    if run.own_group:
        dist_utils.teardown()
    return summary
