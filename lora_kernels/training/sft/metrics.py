"""What a run reports: ``metrics.jsonl`` (+ TensorBoard), ``loss.png``, the summary dict and its printout."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch


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


def print_summary(s: dict, log) -> None:
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
    mem = f"{s['peak_rss_mib']:.0f} MiB RSS (process high-water mark)"
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


def peak_memory(device: torch.device) -> dict:
    """THE peak-memory figure of a run, defined once: the process's RSS high-water mark (``ru_maxrss``, what
    ``/usr/bin/time -v`` reports as "Maximum resident set size": model loading included), plus the CUDA
    allocator's peak on a GPU. The memory breakdown (lora_kernels.training.memory) splits the training phase."""
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    out = {"peak_rss_mib": round(rss_mib, 1)}
    if device.type == "cuda":
        out["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def setup_line(run, counts: dict, backend: str) -> str:
    """One line saying what trains, where, how: precision, the frozen base's dtype and the loss, each with why
    (auto choices name their reason and the field that overrides them), backend, strategy, memory options."""
    from .config import QUANT_BASE_DTYPES
    from .runtime import resolve_base_dtype, resolve_chunked_ce, resolve_fused_blocks, resolve_quant_compute

    cfg = run.cfg

    def names(trainable):
        short = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}
        return "/".join(
            sorted({short.get(p.dtype, str(p.dtype)) for p in run.core.parameters() if p.requires_grad == trainable})
        )

    base, base_why = resolve_base_dtype(cfg, run.device)
    if base in QUANT_BASE_DTYPES:
        compute, compute_why = resolve_quant_compute(cfg, run.device)
        base_why += f"; compute {compute}: {compute_why}"
    chunked = getattr(run.core, "_lk_chunked", None) is not None
    _, ce_why = resolve_chunked_ce(cfg, run.device, run.core)
    memory = [k for k, on in (("activation checkpointing", cfg.gradient_checkpointing),) if on]
    fused = getattr(run.core, "_lk_fused_counts", None)  # set by wrap_model when the blocks were swapped
    _, fused_why = resolve_fused_blocks(cfg, run.device)
    blocks = "eager"
    if fused is not None and any(fused.values()):
        blocks = f"fused: {fused['rms_norm']} RMSNorm, {fused['mlp']} MLP"
    elif fused is not None:
        fused_why += ", but the model has no Llama-style RMSNorm / MLP"
    return (
        f"method {cfg.method}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters "
        f"({100 * counts['trainable_params'] / counts['total_params']:.2f}%); device {run.device}, "
        f"precision {'bf16 autocast' if run.amp_dtype else 'fp32'}"
        + (
            f"; frozen base {names(False) or base} ({base_why}; --base_dtype overrides), trainable weights and "
            f"optimizer state {names(True)}"
            if cfg.method == "lora"
            else ""
        )
        + f"; loss {'chunked CE' if chunked else 'full logits'} ({ce_why}; --[no-]chunked_ce overrides)"
        + f"; blocks {blocks} ({fused_why}; --[no-]fused_blocks overrides)"
        + (f", lora backend {backend}" if cfg.method == "lora" else "")
        + (f"; {run.strategy} over {run.world} processes" if run.world > 1 else "")
        + "; memory: "
        + (", ".join(memory) or "defaults")
    )


def build_summary(run, after: dict, samples_after: list, outputs: dict, mem) -> dict:
    cfg, st = run.cfg, run.data.stats
    before = run.history.get("eval_before", {})
    tt = run.train_time
    return {
        "run_dir": str(run.run_dir),
        "model": cfg.model,
        "method": cfg.method,
        **run.counts,
        "steps": run.total_steps,
        "resumed_from_step": run.start_step if run.resume_path is not None else None,
        "train_examples": st.n_train,
        "eval_examples": st.n_eval,
        "truncated_examples": st.n_truncated,
        "dropped_examples": st.n_dropped_no_target,
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "eval_ppl_before": before.get("eval_ppl"),
        "eval_ppl_after": after.get("eval_ppl"),
        "train_tokens": run.train_tokens,
        "train_time_s": round(tt, 2),
        "tokens_per_s": round(run.train_tokens / tt, 1) if tt > 0 else None,
        "train_cpu_s": round(run.train_cpu, 2),
        "first_step_s": run.history.get("first_step_s"),
        "eval_time_s": round(run.eval_time, 2),
        "wall_time_s": round(time.time() - run.t_start, 1),
        **peak_memory(run.device),
        "memory": mem.as_dict(),
        "distributed": run.strategy,
        "world_size": run.world,
        "device": str(run.device),
        "precision": "bf16-autocast" if run.amp_dtype else "fp32",
        "torch_threads": torch.get_num_threads(),
        "samples_before": run.history.get("samples_before", []),
        "samples_after": samples_after,
        "outputs": outputs,
    }
