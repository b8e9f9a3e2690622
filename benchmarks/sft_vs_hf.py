"""Side by side on one CPU: ``lora-kernels sft`` vs Hugging Face ``Trainer`` + ``peft``, same everything else.

Same model (SmolLM2-135M-Instruct, written once from the GGUF to a safetensors folder so both load it the same way),
same data rows in the same order (our tokenised chatterbot-corpus examples, assistant-only labels, padded to the
longest row of each batch), same LoRA (r=16, alpha=32, all linear layers, dropout 0), same AdamW / clipping /
batch size / steps, fp32. Each side runs in its own process, so its peak RSS (``ru_maxrss``) is its own.

tokens/s counts the non-padding input tokens of steps 2..N divided by their wall time (step 1 is warm-up on both
sides). Appends one row per side to ``benchmarks/results/sft_vs_hf_cpu.csv``.

    python benchmarks/sft_vs_hf.py [--steps 20] [--batch_size 8] [--max_len 256] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sft_vs_hf_cpu.csv"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rows_in_step_order(args, tokenizer):
    """The exact rows our loop trains on, in its step order (so HF sees the same batches)."""
    from lora_kernels.training.sft.config import build_config
    from lora_kernels.training.sft.data import prepare_data
    from lora_kernels.training.sft.sampler import StepSampler, row_lengths

    cfg = build_config(overrides=_sft_overrides(args))
    data = prepare_data(cfg, tokenizer, log=lambda *_: None)
    sampler = StepSampler(len(data.train_rows), args.batch_size, cfg.seed, row_lengths(data, cfg))
    rows = []
    for step in range(args.steps):
        rows += [data.train_rows[i][0] for i in sampler.rows(step)[1]]
    return rows


def _sft_overrides(args) -> dict:
    return dict(
        model=args.model_dir,
        dataset="chatterbot",
        output_dir=args.out,
        name="ours",
        overwrite=True,
        max_len=args.max_len,
        batch_size=args.batch_size,
        grad_accum=1,
        max_steps=args.steps,
        eval_size=96,
        eval_every=0,
        save_every=0,
        lora_r=16,
        lora_alpha=32.0,
        lora_dropout=0.0,
        lr=3e-4,
        warmup_steps=2,
        max_new_tokens=0,
        sample_prompts=[],
        plot=False,
        progress=False,
        num_threads=args.threads,
    )


def child_ours(args) -> dict:
    from lora_kernels.training.sft.config import build_config
    from lora_kernels.training.sft.loop import run_sft

    cfg = build_config(overrides={**_sft_overrides(args), "eval_batch_size": args.batch_size})
    # eval before/after is part of our run but not of the HF one: keep it out of the timed steps (it is), and
    # note that it adds a no-grad forward over 96 examples to our peak RSS.
    summary = run_sft(cfg, log=lambda *_: None)
    recs = [json.loads(ln) for ln in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    tokens = sum(r["tokens"] for r in train[1:])
    secs = sum(r["step_time_s"] for r in train[1:])
    return {
        "tokens_per_s": tokens / secs,
        "steps_timed": len(train) - 1,
        "final_loss": train[-1]["loss"],
        "trainable_params": summary["trainable_params"],
        "peak_rss_mib": _rss_mib(),
    }


def child_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from lora_kernels.training.sft.data import ensure_chat_template

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    ensure_chat_template(tokenizer, log=lambda *_: None)
    rows = _rows_in_step_order(args, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    pad = tokenizer.pad_token_id

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i].input_ids, "labels": rows[i].labels}

    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for b, x in enumerate(items):
            n = len(x["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    targs = TrainingArguments(
        output_dir=os.path.join(args.out, "hf"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=3e-4,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SequentialTrainer(
        model=model, args=targs, train_dataset=Rows(), data_collator=collate, callbacks=[Timer()]
    )
    trainer.train()
    tokens_per_step = [
        sum(len(r) for r in rows[s * args.batch_size : (s + 1) * args.batch_size]) for s in range(args.steps)
    ]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens_per_s": sum(tokens_per_step[1:]) / sum(step_times[1:]),
        "steps_timed": len(step_times) - 1,
        "final_loss": losses[-1] if losses else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_mib": _rss_mib(),
    }


def _export_model(model_dir: Path) -> None:
    if (model_dir / "config.json").is_file():
        return
    from lora_kernels.models import load_causal_lm as load_model
    from lora_kernels.training.sft.export import save_hf_folder

    model, tok = load_model("smollm2")
    save_hf_folder(model, tok, model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model_dir", default=os.path.join(tempfile.gettempdir(), "lora-kernels-smollm2-hf"))
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lora-kernels-sft-vs-hf"))
    ap.add_argument("--child", choices=["ours", "hf"])
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.child:
        res = child_ours(args) if args.child == "ours" else child_hf(args)
        print("RESULT " + json.dumps(res))
        return
    _export_model(Path(args.model_dir))
    results = {}
    for side in ("ours", "hf"):
        cmd = [sys.executable, __file__, "--child", side] + [
            f"--{k}={getattr(args, k)}" for k in ("steps", "batch_size", "max_len", "threads", "model_dir", "out")
        ]
        out = subprocess.run(
            cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
        results[side] = json.loads(line[len("RESULT ") :])
        print(side, results[side], flush=True)
    import peft
    import torch
    import transformers

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(
                ["time_utc", "impl", "model", "steps", "batch_size", "max_len", "threads", "tokens_per_s",
                 "peak_rss_mib", "final_loss", "trainable_params", "tokens_per_s_ratio_vs_hf", "peak_rss_ratio_vs_hf",
                 "torch", "transformers", "peft", "cpu"]
            )  # fmt: skip
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for side, r in results.items():
            w.writerow(
                [now, "lora_kernels" if side == "ours" else "hf_trainer+peft", "SmolLM2-135M-Instruct", args.steps,
                 args.batch_size, args.max_len, args.threads, round(r["tokens_per_s"], 1), round(r["peak_rss_mib"], 1),
                 r["final_loss"], r["trainable_params"],
                 round(r["tokens_per_s"] / results["hf"]["tokens_per_s"], 3),
                 round(r["peak_rss_mib"] / results["hf"]["peak_rss_mib"], 3),
                 torch.__version__, transformers.__version__, peft.__version__, platform.processor() or platform.machine()]
            )  # fmt: skip
    o, h = results["ours"], results["hf"]
    print(
        f"tokens/s ours {o['tokens_per_s']:.1f} vs HF {h['tokens_per_s']:.1f} "
        f"(x{o['tokens_per_s'] / h['tokens_per_s']:.2f}); peak RSS ours {o['peak_rss_mib']:.0f} MiB vs HF "
        f"{h['peak_rss_mib']:.0f} MiB (x{o['peak_rss_mib'] / h['peak_rss_mib']:.2f}) -> {RESULTS}"
    )


if __name__ == "__main__":
    main()
