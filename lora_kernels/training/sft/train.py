"""The SFT loop: ``run_sft(cfg)`` fine-tunes a causal LM with LoRA (our ``LoRALinear``) or full fine-tuning.

Order of work, so that every bad input fails before any training starts::

    validate config -> check run folder / resume checkpoint (manifest, sha256, config fingerprint)
    -> seeds -> model + tokenizer -> data (DataError) -> LoRA injection (target modules must exist)
    -> optimizer (AdamW, decay / no-decay groups) + warmup-cosine schedule -> restore checkpoint
    -> eval + sample generations "before" -> train steps (eval / checkpoint every N) -> eval + samples "after"
    -> adapter / merged / full-model export, loss.png, summary.json

Loss normalisation: every optimizer step sums the token cross-entropy over all micro-batches and divides by the
number of target tokens of the *whole* step, so ``grad_accum=k, batch_size=b`` computes the same gradient as
``grad_accum=1, batch_size=k*b`` (up to summation order), and packed and padded batches of the same examples give
the same loss.

Hooks kept in one place for multi-process / memory work (issue 7): :func:`compute_loss_sum` (the only place logits
meet labels), :func:`wrap_model` (the only place the model may be wrapped), :func:`is_main_process` (only rank 0
writes files).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_kernels.training import distributed as dist_utils

from . import checkpoint as ckpt
from .config import ConfigError, SFTConfig, dump_yaml, resume_fingerprint
from .data import IGNORE_INDEX, SFTData, check_dataset_spec, collate, packed_mask_kind, prepare_data

# Test hook (tests/test_sft_train.py): after logging this step, sleep so the test can SIGKILL a run mid-way at a
# known point. Read once at import; unset in normal use.
_PAUSE_AT_STEP = os.environ.get("LORA_KERNELS_SFT_PAUSE_AT_STEP")


def is_main_process() -> bool:
    return dist_utils.is_main_process()


def resolve_strategy(cfg: SFTConfig) -> str:
    """``none`` | ``ddp`` | ``fsdp``: what ``cfg.distributed`` means for this launch (torchrun sets WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if cfg.distributed in ("auto", "none") or world <= 1:
        return "ddp" if cfg.distributed == "auto" and world > 1 else "none"
    return cfg.distributed


def sft_fingerprint(cfg: SFTConfig) -> dict:
    """The resume fingerprint, with ``batch_size`` as the rows per micro-batch summed over ranks: a run resumes
    with another world size when the global batch is the same (2 ranks x 2 rows = 1 rank x 4 rows)."""
    fp = resume_fingerprint(cfg)
    fp["batch_size"] = cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1") or 1)
    return fp


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(cfg: SFTConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available() and dist_utils.is_distributed():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config field 'device': {cfg.device!r} requested but CUDA is not available")
    return dev


def resolve_precision(cfg: SFTConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32)."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type == "cpu"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config field 'precision': bf16 autocast needs a GPU with bf16 support; use fp32")
    return torch.bfloat16


def _backend_label(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    from lora_kernels import backend_info

    info = backend_info()
    ok = [b for b in info["auto_preference"].get(device.type, []) if info["backends"].get(b, {}).get("available")]
    return f"auto -> {ok[0] if ok else 'none available'} on {device.type}"


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Model setup
# ---------------------------------------------------------------------------------------------------------------


def apply_method(model, cfg: SFTConfig) -> dict:
    """Make the right parameters trainable. Returns counts for the summary."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        return {"trainable_params": n, "total_params": n, "lora_modules": 0}
    from lora_kernels.adapters.inject import apply_lora

    try:
        report = apply_lora(
            model,
            target_modules=cfg.target_modules,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            exclude_modules=cfg.exclude_modules,
            modules_to_save=cfg.modules_to_save,
            backend=None if cfg.backend == "auto" else cfg.backend,
            deterministic=cfg.deterministic,
        )
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"LoRA injection failed for target_modules={cfg.target_modules!r}: {e}") from e
    if not report.replaced:
        raise ConfigError(f"target_modules={cfg.target_modules!r} matched no nn.Linear module of the model")
    return {
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "lora_modules": len(report.replaced),
    }


def wrap_model(model, cfg: SFTConfig, device: torch.device):
    """Place the model for training: low-precision frozen base, checkpointing, chunked loss, then DDP / FSDP2.

    Returns ``(model, core)``: ``model`` is what the training step calls (maybe a DDP wrapper), ``core`` the
    Hugging Face model itself (generation, exports, checkpoint names).
    """
    from lora_kernels.training.losses import enable_chunked_loss
    from lora_kernels.training.memory import cast_frozen_params, enable_gradient_checkpointing

    base_dtype = cfg.base_dtype
    if base_dtype == "auto":
        base_dtype = "bf16" if device.type == "cuda" and cfg.method == "lora" else "fp32"
    if base_dtype == "bf16":
        cast_frozen_params(model, torch.bfloat16)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.chunked_ce:
        enable_chunked_loss(model, chunk_size=cfg.ce_chunk_size)
    model = model.to(device)
    strategy = resolve_strategy(cfg)
    mp = torch.bfloat16 if len({p.dtype for p in model.parameters()}) > 1 else None
    wrapped = dist_utils.wrap_model(model, strategy, device=device, mixed_precision=mp)
    return wrapped, dist_utils.unwrap_model(wrapped)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norm weights and embeddings (as HF Trainer does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or "embed" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return groups


def lr_lambda(cfg: SFTConfig, total_steps: int):
    """Linear warmup to 1 over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``total_steps``."""
    warm, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------------------------
# Loss, eval, generation
# ---------------------------------------------------------------------------------------------------------------


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def compute_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's targets (fp32 scalar). The one place logits meet labels."""
    if getattr(dist_utils.unwrap_model(model), "_lk_chunked", None) is not None:
        # chunked CE (lora_kernels.training.losses.enable_chunked_loss): no logits; num_items_in_batch=1 -> the sum
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            shift_labels=batch["targets"],
            num_items_in_batch=1,
        ).loss
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    logits = out.logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        batch["targets"].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.no_grad()
def evaluate(model, rows, cfg: SFTConfig, pad_id: int, device, amp_dtype) -> dict:
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), cfg.eval_batch_size):
        batch = _to_device(collate(rows[i : i + cfg.eval_batch_size], pad_id), device)
        with autocast_ctx(device, amp_dtype):
            total += float(compute_loss_sum(model, batch))
        count += batch["n_targets"]
    model.train(was_training)
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


@torch.no_grad()
def generate_samples(model, tokenizer, cfg: SFTConfig, device, amp_dtype) -> list[dict]:
    if not cfg.sample_prompts or cfg.max_new_tokens == 0:
        return []
    was_training = model.training
    model.eval()
    out = []
    for prompt in cfg.sample_prompts:
        msgs = [{"role": "user", "content": prompt}]
        if cfg.system_prompt:
            msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        with autocast_ctx(device, amp_dtype):
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        reply = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
        out.append({"prompt": prompt, "reply": reply})
    model.train(was_training)
    return out


def peak_memory(device: torch.device) -> dict:
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    out = {"peak_rss_mib": round(rss_mib, 1)}
    if device.type == "cuda":
        out["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line (``type`` = train | eval), flushed per line."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard_dir: Path | None):
        self.path = path
        if resume_step is not None and path.exists():
            # drop what a killed run logged after its last checkpoint: the resumed run logs those steps again
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif path.exists():
            path.unlink()
        self.f = path.open("a")
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "type") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{rec['type']}/{k}", v, rec["step"])

    def records(self) -> list[dict]:
        self.f.flush()
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(records: list[dict], path: Path, log) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed; loss.png not written (pip install matplotlib)")
        return False
    train = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r["type"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


class StepSampler:
    """Rows for optimizer step ``s``: epoch ``s // steps_per_epoch`` visits rows in a ``torch.randperm`` order seeded
    with ``seed + epoch``; step ``s`` takes the next ``rows_per_step`` of it (a tail that does not fill a step is
    skipped). Depends only on (seed, s), which makes resume exact and ``k x b`` accumulation see the same rows as
    one batch of ``k*b``.

    ``lengths`` (tokens per row) turns on grouping by length: the epoch's shuffled rows are cut into windows of
    ``GROUP_WINDOW`` steps, each window is sorted by length (longest first) and cut into steps, and the steps of
    the epoch are then visited in a seeded random order. Every row is still seen once per epoch and each step's
    rows still depend only on (seed, s, rows_per_step), but a step's rows have similar lengths, so padding to the
    longest row of a micro-batch wastes little: on the default chatterbot data (mean 59 tokens, max 256) the
    first 80 steps at 8 rows pad to 1.93x the real tokens without grouping and 1.08x with it.
    """

    GROUP_WINDOW = 32  # steps per sorted window: long enough to find similar lengths, short enough to keep mixing

    def __init__(self, n_rows: int, rows_per_step: int, seed: int, lengths: list[int] | None = None):
        if lengths is not None and len(lengths) != n_rows:
            raise ValueError(f"lengths must have one entry per row ({n_rows}), got {len(lengths)}")
        self.n_rows, self.rows_per_step, self.seed, self.lengths = n_rows, rows_per_step, seed, lengths
        self.steps_per_epoch = n_rows // rows_per_step
        self._epoch, self._perm = None, None

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n_rows, generator=g).tolist()
        if self.lengths is None:
            return perm
        used = perm[: self.steps_per_epoch * self.rows_per_step]
        window = self.GROUP_WINDOW * self.rows_per_step
        steps = []
        for w0 in range(0, len(used), window):
            chunk = sorted(used[w0 : w0 + window], key=lambda i: -self.lengths[i])  # stable: ties keep shuffle order
            steps += [chunk[j : j + self.rows_per_step] for j in range(0, len(chunk), self.rows_per_step)]
        order = torch.randperm(len(steps), generator=g).tolist()
        return [i for k in order for i in steps[k]]

    def rows(self, step: int) -> tuple[int, list[int]]:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = self._epoch_order(epoch)
            self._epoch = epoch
        return epoch, self._perm[j * self.rows_per_step : (j + 1) * self.rows_per_step]


def row_lengths(data: SFTData, cfg: SFTConfig) -> list[int] | None:
    """Tokens per training row for ``StepSampler``'s grouping, or None when ``group_by_length`` is off."""
    return [sum(len(ex) for ex in row) for row in data.train_rows] if cfg.group_by_length else None


def _prepare_run_dir(cfg: SFTConfig) -> tuple[Path, Path | None, dict | None]:
    """Check the run folder and the resume checkpoint before anything heavy is loaded."""
    run_dir = cfg.run_dir
    ckpt_root = run_dir / "checkpoints"
    if cfg.resume is not None:
        path = ckpt.resolve_resume(cfg.resume, ckpt_root)
        state = ckpt.verify_checkpoint(path)
        ckpt.check_fingerprint(path, state, sft_fingerprint(cfg))
        return run_dir, path, state
    if ckpt.list_checkpoints(ckpt_root):
        if not cfg.overwrite:
            raise ConfigError(
                f"run folder {run_dir} already holds checkpoints: pass --resume to continue it, "
                "--overwrite to start again, or --name to use another folder"
            )
        if is_main_process():  # one rank deletes; the others wait at the barrier in run_sft
            shutil.rmtree(ckpt_root)
    return run_dir, None, None


def _print_flush(*args) -> None:
    print(*args, flush=True)


def run_sft(cfg: SFTConfig, log=_print_flush) -> dict:
    """Run one SFT job as configured; returns the summary dict (also written to ``<run_dir>/summary.json``)."""
    cfg.validate()
    t_start = time.time()
    strategy = resolve_strategy(cfg)
    own_group = strategy != "none" and not dist_utils.is_distributed()
    if strategy != "none":
        dev_kind = None if cfg.device == "auto" else torch.device(cfg.device).type
        dist_utils.init_distributed(device=dev_kind)
    world = dist_utils.get_world_size()
    main = is_main_process()
    if not main:
        log = lambda *a, **k: None  # noqa: E731 - one voice: rank 0 prints
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tensorboard: true needs the 'tensorboard' package (pip install tensorboard)") from None
    run_dir, resume_path, resume_state = _prepare_run_dir(cfg)
    dist_utils.barrier()
    check_dataset_spec(cfg.dataset)
    device = resolve_device(cfg)
    amp_dtype = resolve_precision(cfg, device)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)

    from .modeling import load_model

    t0 = time.time()
    model, tokenizer = load_model(cfg.model)
    log(f"model {cfg.model}: {type(model).__name__} loaded in {time.time() - t0:.1f} s")
    data: SFTData = prepare_data(cfg, tokenizer, log=log)
    st = data.stats
    log(
        f"data {cfg.dataset}: {st.n_conversations} conversations -> {st.n_train} train / {st.n_eval} eval examples, "
        f"{st.n_train_rows} train rows{' (packed)' if cfg.packing else ''}; truncated to max_len={cfg.max_len}: "
        f"{st.n_truncated}; dropped (no assistant token left): {st.n_dropped_no_target}; longest: {st.max_example_len}"
    )
    mask_kind = packed_mask_kind(model) if cfg.packing else "additive"
    rows_per_step = cfg.batch_size * cfg.grad_accum * world  # global: each rank takes its slice of every step
    sampler = StepSampler(len(data.train_rows), rows_per_step, cfg.seed, row_lengths(data, cfg))
    if sampler.steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size * grad_accum = {rows_per_step} rows per step, but the training set has only "
            f"{len(data.train_rows)} rows"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * sampler.steps_per_epoch))
    counts = apply_method(model, cfg)
    model, core = wrap_model(model, cfg, device)  # the optimizer is built after wrapping (FSDP2 swaps params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        foreach=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    log(
        f"method {cfg.method}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters "
        f"({100 * counts['trainable_params'] / counts['total_params']:.2f}%); device {device}, "
        f"precision {'bf16 autocast' if amp_dtype else 'fp32'}"
        + (f", lora backend {_backend_label(cfg.backend, device)}" if cfg.method == "lora" else "")
        + (f"; {strategy} over {world} processes" if world > 1 else "")
        + "; memory: "
        + (
            ", ".join(
                k
                for k, on in (
                    ("activation checkpointing", cfg.gradient_checkpointing),
                    ("chunked CE", cfg.chunked_ce),
                    ("bf16 frozen base", any(p.dtype == torch.bfloat16 for p in core.parameters())),
                )
                if on
            )
            or "defaults"
        )
    )

    start_step, history = 0, {}
    if resume_path is not None:
        files = ckpt.load_checkpoint_files(resume_path)
        # FSDP checkpoints hold name-keyed full state (dist_utils.full_state_dicts): loadable at any world size
        # and strategy; the others hold index-keyed optimizer state (single process / DDP, any world size).
        named = any(isinstance(k, str) for k in files["optimizer"].get("state", {}))
        if strategy != "fsdp" and not named:
            ckpt.load_trainable_into(core, files["trainable"], resume_path)
        try:
            if strategy == "fsdp" or named:
                dist_utils.load_full_state_dicts(model, optimizer, files["trainable"], files["optimizer"])
            else:
                optimizer.load_state_dict(files["optimizer"])
            scheduler.load_state_dict(files["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {resume_path}: optimizer/scheduler state does not fit: {e}") from e
        ckpt.restore_rng_state(files["rng"])
        start_step = resume_state["step"]
        history = resume_state.get("history", {})
        log(f"resumed from {resume_path} at step {start_step}/{total_steps}")

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    metrics = (
        MetricsLog(
            run_dir / "metrics.jsonl",
            start_step if resume_path is not None else None,
            run_dir / "tensorboard" if cfg.tensorboard else None,
        )
        if main
        else None
    )
    pad_id = tokenizer.pad_token_id

    if resume_path is None:
        before = evaluate(model, data.eval_rows, cfg, pad_id, device, amp_dtype)
        if before:
            log(f"eval before training: loss {before['eval_loss']:.4f}, ppl {before['eval_ppl']:.2f}")
            if metrics:
                metrics.write({"type": "eval", "step": 0, **before})
        history = {"eval_before": before, "samples_before": generate_samples(core, tokenizer, cfg, device, amp_dtype)}
        history["train_time_s"], history["train_tokens"] = 0.0, 0
        for s in history["samples_before"]:
            log(f"  [before] {s['prompt']!r} -> {s['reply']!r}")

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps, initial=start_step, desc="sft", dynamic_ncols=True, disable=not (cfg.progress and main)
    )
    say = bar.write if not bar.disable else log

    from lora_kernels.training.memory import PeakMemory, memory_report

    peak = PeakMemory(device).start()  # after loading: the baseline holds the weights
    model.train()
    train_time, train_tokens = history.get("train_time_s", 0.0), history.get("train_tokens", 0)
    train_cpu = history.get("train_cpu_s", 0.0)
    last_eval = None
    for step in range(start_step, total_steps):
        t_step, cpu_step = time.time(), time.process_time()
        epoch, row_ids = sampler.rows(step)
        rows = [data.train_rows[i] for i in row_ids][dist_utils.shard_slice(len(row_ids))]
        micro = [collate(rows[i : i + cfg.batch_size], pad_id, mask_kind) for i in range(0, len(rows), cfg.batch_size)]
        local_targets = sum(mb["n_targets"] for mb in micro)
        # Divide by the global target count (x world: DDP averages the ranks' gradients): every rank then
        # contributes its share of the single-process gradient of the whole global batch.
        n_targets = int(dist_utils.all_reduce_sum(local_targets).item())
        divisor = n_targets / world
        n_tokens = int(dist_utils.all_reduce_sum(sum(len(ex) for row in rows for ex in row)).item())
        loss_sum = 0.0
        for i, mb in enumerate(micro):
            mb = _to_device(mb, device)
            with dist_utils.no_sync(model, skip=i < len(micro) - 1):
                with autocast_ctx(device, amp_dtype):
                    ls = compute_loss_sum(model, mb)
                (ls / divisor).backward()
            loss_sum += float(ls.detach())
        loss_sum = float(dist_utils.all_reduce_sum(loss_sum).item())
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP2
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt, cpu_dt = time.time() - t_step, time.process_time() - cpu_step
        peak.update()
        train_time += dt
        train_cpu += cpu_dt
        train_tokens += n_tokens
        loss = loss_sum / n_targets
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: loss is {loss}; stopping (lower lr, or check the data)")
        rec = {
            "type": "train",
            "step": step + 1,
            "epoch": epoch,
            "loss": loss,
            "lr": lr_now,
            "grad_norm": grad_norm,
            "tokens": n_tokens,
            "target_tokens": n_targets,
            "tokens_per_s": n_tokens / dt,
            "step_time_s": dt,
            # process CPU seconds (all threads): on a shared, oversubscribed machine tokens / cpu_s is the
            # figure that still compares across runs when wall-clock tokens/s does not
            "cpu_s": cpu_dt,
        }
        if metrics:
            metrics.write(rec)
        if _PAUSE_AT_STEP is not None and step + 1 == int(_PAUSE_AT_STEP):
            time.sleep(3600)  # test hook: hold here so a test can SIGKILL the process at a known step
        bar.update(1)
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{train_tokens / train_time:.0f}")
            if bar.disable and main:  # no progress bar (e.g. logs to a file): one line per log_every steps
                log(
                    f"step {step + 1}/{total_steps}  loss {loss:.4f}  lr {lr_now:.2e}  "
                    f"tokens/s {train_tokens / train_time:.0f}"
                )
        done = step + 1 == total_steps
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
            last_eval = evaluate(model, data.eval_rows, cfg, pad_id, device, amp_dtype)
            if last_eval:
                say(f"step {step + 1}: eval loss {last_eval['eval_loss']:.4f}, ppl {last_eval['eval_ppl']:.2f}")
                if metrics:
                    metrics.write({"type": "eval", "step": step + 1, **last_eval})
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and strategy == "fsdp":
            trainable_sd, optim_sd = dist_utils.full_state_dicts(model, optimizer)  # collective: every rank
        elif cfg.save_every and (step + 1) % cfg.save_every == 0:
            trainable_sd = {n: p for n, p in core.named_parameters() if p.requires_grad}
            optim_sd = optimizer.state_dict()
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and main:
            history["train_time_s"], history["train_tokens"] = train_time, train_tokens
            history["train_cpu_s"] = train_cpu
            ckpt.save_checkpoint(
                run_dir / "checkpoints",
                step + 1,
                trainable=trainable_sd,
                optimizer_state=optim_sd,
                scheduler_state=scheduler.state_dict(),
                trainer_state={
                    "epoch": epoch,
                    "rows_consumed": (step + 1) * rows_per_step,
                    "total_steps": total_steps,
                    "fingerprint": sft_fingerprint(cfg),
                    "world_size": world,
                    "history": history,
                },
                keep_last=cfg.keep_last,
            )
    bar.close()
    peak.stop()
    mem = memory_report(core, optimizer, peak)

    after = evaluate(model, data.eval_rows, cfg, pad_id, device, amp_dtype)
    if after and metrics:
        metrics.write({"type": "eval", "step": total_steps, **after})
    samples_after = generate_samples(core, tokenizer, cfg, device, amp_dtype)

    outputs = {}
    export_core = core
    if strategy == "fsdp":  # sharded weights: rebuild an unsharded model on rank 0 from the gathered state
        full_sd, _ = dist_utils.full_state_dicts(model, trainable_only=cfg.method == "lora")  # collective
        if main:
            from .modeling import load_model

            export_core, _ = load_model(cfg.model)
            apply_method(export_core, cfg)
            ckpt.load_trainable_into(export_core, full_sd, run_dir)
    if main:
        from .export import export_adapter, export_merged, save_hf_folder

        if cfg.method == "lora":
            outputs["adapter"] = str(
                export_adapter(export_core, run_dir / "adapter", base_model_name_or_path=_base_name(cfg, export_core))
            )
            if cfg.merge:
                outputs["merged"] = str(export_merged(export_core, tokenizer, run_dir / "merged"))
        else:
            outputs["model"] = str(save_hf_folder(export_core, tokenizer, run_dir / "model"))
            if cfg.merge:
                log("note: --merge has nothing to merge with method=full; the model is in model/")
        if metrics and cfg.plot and plot_losses(metrics.records(), run_dir / "loss.png", log):
            outputs["loss_plot"] = str(run_dir / "loss.png")

    before = history.get("eval_before", {})
    summary = {
        "run_dir": str(run_dir),
        "model": cfg.model,
        "method": cfg.method,
        **counts,
        "steps": total_steps,
        "resumed_from_step": start_step if resume_path is not None else None,
        "train_examples": st.n_train,
        "eval_examples": st.n_eval,
        "truncated_examples": st.n_truncated,
        "dropped_examples": st.n_dropped_no_target,
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "eval_ppl_before": before.get("eval_ppl"),
        "eval_ppl_after": after.get("eval_ppl"),
        "train_tokens": train_tokens,
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(train_tokens / train_time, 1) if train_time > 0 else None,
        "train_cpu_s": round(train_cpu, 2),
        "wall_time_s": round(time.time() - t_start, 1),
        **peak_memory(device),
        "memory": mem.as_dict(),
        "distributed": strategy,
        "world_size": world,
        "device": str(device),
        "precision": "bf16-autocast" if amp_dtype else "fp32",
        "torch_threads": torch.get_num_threads(),
        "samples_before": history.get("samples_before", []),
        "samples_after": samples_after,
        "outputs": outputs,
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if metrics:
            metrics.close()
    _print_summary(summary, log)
    log(str(mem))
    dist_utils.barrier()
    if own_group:
        dist_utils.teardown()
    return summary


def _base_name(cfg: SFTConfig, model) -> str:
    """What the adapter records as its base: the hub id for the built-in SmolLM2, else the model folder given."""
    if cfg.model == "smollm2":
        return model.config.name_or_path
    return str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model


def _print_summary(s: dict, log) -> None:
    def fmt(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    log("=" * 78)
    log(f"SFT summary ({s['method']}, {s['model']}) -> {s['run_dir']}")
    log(f"  trainable params : {s['trainable_params']:,} / {s['total_params']:,}")
    log(f"  steps            : {s['steps']}  ({s['train_examples']} train / {s['eval_examples']} eval examples)")
    log(f"  eval loss        : {fmt(s['eval_loss_before'])} -> {fmt(s['eval_loss_after'])}")
    log(f"  eval perplexity  : {fmt(s['eval_ppl_before'], '.2f')} -> {fmt(s['eval_ppl_after'], '.2f')}")
    log(
        f"  tokens/s (train) : {fmt(s['tokens_per_s'], '.1f')}  ({s['train_tokens']:,} tokens in {s['train_time_s']} s)"
    )
    mem = f"{s['peak_rss_mib']:.0f} MiB RSS"
    if "peak_cuda_allocated_mib" in s:
        mem += f", {s['peak_cuda_allocated_mib']:.0f} MiB CUDA allocated"
    log(f"  peak memory      : {mem}")
    log(f"  wall time        : {s['wall_time_s']} s")
    for before, after in zip(s["samples_before"], s["samples_after"]):
        log(f"  prompt: {before['prompt']!r}")
        log(f"    before: {before['reply']!r}")
        log(f"    after : {after['reply']!r}")
    for k, v in s["outputs"].items():
        log(f"  {k:<17}: {v}")
    log("=" * 78)
