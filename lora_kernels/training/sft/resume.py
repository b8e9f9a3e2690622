"""The run folder and exact resume: pick and verify the checkpoint before anything heavy loads, restore every
piece of training state from it, and write a checkpoint at a step (atomically: checkpoint.py).

``--resume latest`` takes the newest checkpoint that verifies (manifest, sizes, sha256, format version); a newer
one that does not is skipped with a warning naming it and why, so a run killed while its newest checkpoint was
damaged still continues from the previous one. No valid checkpoint is an error that lists every failure. A
configuration that differs from the checkpoint's (the resume fingerprint) is always an error, never skipped.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lora_kernels.training import distributed as dist_utils

from . import checkpoint as ckpt
from .config import ConfigError, SFTConfig, resume_fingerprint

logger = logging.getLogger("lora_kernels")


def sft_fingerprint(cfg: SFTConfig) -> dict:
    """The resume fingerprint, with ``batch_size`` as the rows per micro-batch summed over ranks: a run resumes
    with another world size when the global batch is the same (2 ranks x 2 rows = 1 rank x 4 rows)."""
    fp = resume_fingerprint(cfg)
    fp["batch_size"] = cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1") or 1)
    return fp


def latest_valid_checkpoint(root: Path, log=None) -> tuple[Path, dict]:
    """The newest checkpoint under ``root`` that verifies, and its trainer state; skipped ones are warned about."""
    found = ckpt.list_checkpoints(root)
    if not found:
        raise ckpt.CheckpointError(f"--resume latest: no checkpoint found in {root}")
    failures = []
    for _, path in reversed(found):
        try:
            state = ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError as e:
            failures.append(str(e))
            continue
        for why in failures:
            msg = f"--resume latest: skipping a damaged checkpoint: {why}; resuming from {path} instead"
            logger.warning("lora_kernels: %s", msg)
            if log is not None:
                log(f"warning: {msg}")
        return path, state
    raise ckpt.CheckpointError("--resume latest: no valid checkpoint in " + f"{root}:\n  " + "\n  ".join(failures))


def prepare_run_dir(cfg: SFTConfig, log=None) -> tuple[Path, Path | None, dict | None]:
    """Check the run folder and the resume checkpoint before anything heavy is loaded:
    ``(run_dir, checkpoint path or None, its trainer state or None)``."""
    run_dir = cfg.run_dir
    ckpt_root = run_dir / "checkpoints"
    if cfg.resume is not None:
        if cfg.resume == "latest":
            path, state = latest_valid_checkpoint(ckpt_root, log)
        else:
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
        if dist_utils.is_main_process():  # one rank deletes; the others wait at the barrier in run_sft
            shutil.rmtree(ckpt_root)
    return run_dir, None, None


def restore(run, path: Path, state: dict) -> None:
    """Load a verified checkpoint into ``run`` (model, optimizer, scheduler, RNG, step, history)."""
    files = ckpt.load_checkpoint_files(path)
    # FSDP checkpoints hold name-keyed full state (dist_utils.full_state_dicts): loadable at any world size and
    # strategy; the others hold index-keyed optimizer state (single process / DDP, any world size).
    named = any(isinstance(k, str) for k in files["optimizer"].get("state", {}))
    if run.strategy != "fsdp" and not named:
        ckpt.load_trainable_into(run.core, files["trainable"], path)
    try:
        if run.strategy == "fsdp" or named:
            dist_utils.load_full_state_dicts(run.model, run.optimizer, files["trainable"], files["optimizer"])
        else:
            run.optimizer.load_state_dict(files["optimizer"])
        run.scheduler.load_state_dict(files["scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"checkpoint {path}: optimizer/scheduler state does not fit: {e}") from e
    ckpt.restore_rng_state(files["rng"])
    run.start_step = state["step"]
    run.history = state.get("history", {})


def save(run, step: int, epoch: int) -> None:
    """Checkpoint after ``step`` optimizer steps (every rank calls it: FSDP gathers collectively; rank 0 writes)."""
    cfg = run.cfg
    if run.strategy == "fsdp":
        trainable_sd, optim_sd = dist_utils.full_state_dicts(run.model, run.optimizer)  # collective: every rank
    else:
        trainable_sd = {n: p for n, p in run.core.named_parameters() if p.requires_grad}
        optim_sd = run.optimizer.state_dict()
    if not run.main:
        return
    run.history.update(train_time_s=run.train_time, train_tokens=run.train_tokens, train_cpu_s=run.train_cpu)
    ckpt.save_checkpoint(
        run.run_dir / "checkpoints",
        step,
        trainable=trainable_sd,
        optimizer_state=optim_sd,
        scheduler_state=run.scheduler.state_dict(),
        trainer_state={
            "epoch": epoch,
            "rows_consumed": step * run.rows_per_step,
            "total_steps": run.total_steps,
            "fingerprint": sft_fingerprint(cfg),
            "world_size": run.world,
            "history": run.history,
        },
        keep_last=cfg.keep_last,
    )
