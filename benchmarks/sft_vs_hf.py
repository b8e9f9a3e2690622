"""Side by side on one CPU: ``lora-kernels sft`` vs Hugging Face ``Trainer`` + ``peft``, in two pairings.

Every run is its own process (its peak RSS, ``ru_maxrss``, is its own), on the same model (SmolLM2-135M-Instruct
from ``lora_kernels.models.sources``, written once to a safetensors folder so both stacks load the same files),
the same training rows in the same step order (our tokenised chatterbot-corpus examples, assistant-only labels,
steps grouped by length as our sampler makes them; HF reads them in that order: its ``group_by_length``), the
same LoRA (r=16, alpha=32, all linear layers), AdamW at the same lr / warmup / clipping, batch size and steps. The
configurations (``--configs``):

* ``ours``: ``lora-kernels sft`` as a user runs it (every speed / memory field at its default: on a CPU with bf16
  instructions a bf16 frozen base and the chunked loss), plus the benchmark's data / step settings.
* ``hf_equal``: pairing (a), **equal settings**: HF loads the base in the dtype ours picks on this CPU (bf16 where it
  has bf16 instructions, fp32 elsewhere; ``get_peft_model`` keeps the adapters in fp32, PEFT's
  ``autocast_adapter_dtype``), the same LoRA dropout as ours (our default, 0.05), no checkpointing on either side;
  the differences left are the implementations (ours: fused LoRA op with the mask regenerated, chunked loss over
  the labelled rows; HF: PEFT layers with ``nn.Dropout``, full-vocabulary logits).
* ``hf_plain``: pairing (b), **default against default**: a plain ``Trainer`` + ``get_peft_model`` script (the
  model as ``from_pretrained`` gives it, fp32 here; ``LoraConfig``'s default dropout, 0; ``DataCollatorForSeq2Seq``;
  Trainer's default optimizer).
* ``ours_fp32``: ``--base_dtype fp32 --no-chunked_ce``, the fp32 reference: the eval loss of ``ours`` after the
  run is compared with it (issue 19: within 2%).

Rounds run every configuration once, in a rotated order; ratios are taken within a round (``ours`` over the HF
run of the same round), then the median and range over rounds are reported. tokens/s counts the non-padding
input tokens of steps 2..N divided by their wall time (step 1 is warm-up on both sides; HF's step time excludes
its data loader). One CSV row per run goes to ``benchmarks/results/sft_vs_hf_pairings_cpu.csv``, the summary to
``sft_vs_hf_pairings_cpu_<isa>.md`` (``<isa>``: ``avx512_bf16`` / ``amx_bf16``, or ``no_bf16``: the two machine
classes give different defaults). Run it alone: ``flock /tmp/lk-bench.lock python benchmarks/sft_vs_hf.py``.

    python benchmarks/sft_vs_hf.py [--rounds 3] [--steps 8] [--batch_size 8] [--max_len 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sft_vs_hf_pairings_cpu.csv"
CONFIGS = ("ours", "hf_equal", "hf_plain", "ours_fp32")
PAIRINGS = {"a_equal_settings": "hf_equal", "b_default_vs_default": "hf_plain"}
COLUMNS = ["time_utc", "round", "config", "base_dtype", "loss_impl", "lora_dropout", "steps", "batch_size", "max_len",
           "threads",
           "tokens_timed", "seconds_timed", "tokens_per_s", "peak_rss_mib", "final_train_loss", "eval_loss_after",
           "trainable_params", "load_avg_1m", "torch", "transformers", "peft", "cpu", "cpu_bf16"]  # fmt: skip


def _isa() -> str:
    """The machine class: the CPU's bf16 instructions (``avx512_bf16`` / ``amx_bf16``) or ``no_bf16``."""
    from lora_kernels.training.sft.runtime import cpu_bf16_instructions

    return cpu_bf16_instructions() or "no_bf16"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sft_overrides(args, config: str) -> dict:
    """The benchmark's data / step settings; everything else at ``lora-kernels sft``'s defaults."""
    out = dict(
        model=args.model_dir,
        dataset="chatterbot",
        output_dir=args.out,
        name=config,
        overwrite=True,
        max_len=args.max_len,
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_steps=2,
        eval_size=args.eval_size,
        eval_every=0,
        save_every=0,
        max_new_tokens=0,
        sample_prompts=[],
        plot=False,
        progress=False,
        num_threads=args.threads,
    )
    if config == "ours_fp32":
        out.update(base_dtype="fp32", chunked_ce=False)
    return out


def _rows_in_step_order(args, tokenizer):
    """The exact rows our loop trains on, in its step order (so HF sees the same batches)."""
    from lora_kernels.training.sft.config import build_config
    from lora_kernels.training.sft.data import prepare_data
    from lora_kernels.training.sft.sampler import StepSampler, row_lengths

    cfg = build_config(overrides=_sft_overrides(args, "ours"))
    data = prepare_data(cfg, tokenizer, log=lambda *_: None)
    sampler = StepSampler(len(data.train_rows), args.batch_size, cfg.seed, row_lengths(data, cfg))
    rows = []
    for step in range(args.steps):
        rows += [data.train_rows[i][0] for i in sampler.rows(step)[1]]
    return rows


def child_ours(args) -> dict:
    from lora_kernels.training.sft.config import build_config
    from lora_kernels.training.sft.loop import run_sft

    cfg = build_config(overrides=_sft_overrides(args, args.child))
    setup = []
    summary = run_sft(cfg, log=setup.append)
    recs = [json.loads(ln) for ln in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    line = next(s for s in setup if isinstance(s, str) and s.startswith("method "))
    return {
        "tokens_timed": sum(r["tokens"] for r in train[1:]),
        "seconds_timed": sum(r["step_time_s"] for r in train[1:]),
        "final_train_loss": train[-1]["loss"],
        "eval_loss_after": summary["eval_loss_after"],
        "trainable_params": summary["trainable_params"],
        "base_dtype": line.split("frozen base ", 1)[1].split(" ", 1)[0],
        "lora_dropout": cfg.lora_dropout,
        "loss_impl": "chunked CE" if "loss chunked CE" in line else "full logits",
        "setup_line": line,
        "peak_rss_mib": _rss_mib(),
    }


def _equal_settings(args) -> tuple[str, float]:
    """Our frozen-base dtype on this CPU and our LoRA dropout: what the equal-settings HF run copies."""
    import torch

    from lora_kernels.training.sft.config import build_config
    from lora_kernels.training.sft.runtime import resolve_base_dtype

    cfg = build_config(overrides=_sft_overrides(args, "ours"))
    return resolve_base_dtype(cfg, torch.device("cpu"))[0], cfg.lora_dropout


def _hf_model(args, plain: bool, base_dtype: str, dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # plain: what from_pretrained gives (the folder's dtype, fp32); equal settings: ours' base dtype
    dtype = {} if plain else {"dtype": {"bf16": torch.bfloat16, "fp32": torch.float32}[base_dtype]}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, **dtype)
    model.config.use_cache = False
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)  # autocast_adapter_dtype=True (default): fp32 adapters on a bf16 base


def _pad_collate(pad: int):
    import torch

    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for b, x in enumerate(items):
            n = len(x["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def child_hf(args) -> dict:
    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from lora_kernels.training.sft.data import ensure_chat_template

    plain = args.child == "hf_plain"
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    ensure_chat_template(tokenizer, log=lambda *_: None)
    rows = _rows_in_step_order(args, tokenizer)
    base_dtype, dropout = ("fp32", 0.0) if plain else _equal_settings(args)  # plain: LoraConfig's default dropout
    model = _hf_model(args, plain, base_dtype, dropout)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i].input_ids, "labels": rows[i].labels}

    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    class SameOrderTrainer(Trainer):  # our step order (grouped by length) instead of a random sampler
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    optim = {} if plain else {"optim": "adamw_torch"}  # plain: Trainer's default (fused AdamW)
    targs = TrainingArguments(
        output_dir=os.path.join(args.out, args.child), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=3e-4, warmup_steps=2, lr_scheduler_type="cosine", max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0, **optim,
    )  # fmt: skip
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest") if plain else _pad_collate(tokenizer.pad_token_id)
    trainer = SameOrderTrainer(model=model, args=targs, train_dataset=Rows(), data_collator=collate,
                               callbacks=[Timer()])  # fmt: skip
    trainer.train()
    b = args.batch_size
    tokens = [sum(len(r) for r in rows[s * b : (s + 1) * b]) for s in range(args.steps)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens_timed": sum(tokens[1:]),
        "seconds_timed": sum(step_times[1:]),
        "final_train_loss": losses[-1] if losses else None,
        "eval_loss_after": None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base_dtype": base_dtype,
        "lora_dropout": dropout,
        "loss_impl": "full logits",
        "peak_rss_mib": _rss_mib(),
    }


def _export_model(model_dir: Path) -> None:
    if (model_dir / "config.json").is_file():
        return
    from lora_kernels.models import load_causal_lm
    from lora_kernels.training.sft.export import save_hf_folder

    model, tok = load_causal_lm("smollm2")
    save_hf_folder(model, tok, model_dir)


def _run_child(args, config: str) -> dict:
    cmd = [sys.executable, __file__, "--child", config] + [
        f"--{k}={getattr(args, k)}" for k in ("steps", "batch_size", "max_len", "threads", "eval_size", "model_dir",
                                              "out")
    ]  # fmt: skip
    load = os.getloadavg()[0]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"{config} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT ") :])
    res["tokens_per_s"] = res["tokens_timed"] / res["seconds_timed"]
    res["load_avg_1m"] = round(load, 2)
    return res


def _write_row(args, rnd: int, config: str, r: dict) -> None:
    import peft
    import torch
    import transformers

    new = not RESULTS.exists()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        w.writerow(
            [now, rnd, config, r["base_dtype"], r["loss_impl"], r["lora_dropout"], args.steps, args.batch_size, args.max_len,
             args.threads, r["tokens_timed"], round(r["seconds_timed"], 2), round(r["tokens_per_s"], 1),
             round(r["peak_rss_mib"], 1), r["final_train_loss"], r["eval_loss_after"], r["trainable_params"],
             r["load_avg_1m"], torch.__version__, transformers.__version__, peft.__version__,
             platform.processor() or platform.machine(), _isa()]
        )  # fmt: skip


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}x (range {min(xs):.2f}-{max(xs):.2f}, n={len(xs)})"


def summarise(rounds: list[dict], args) -> str:
    """Markdown: per pairing, the median and range over rounds of the within-round ratios, and the eval check."""
    lines = [f"# lora-kernels sft vs HF Trainer + PEFT (CPU, {args.threads} thread(s) per process)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, bf16 instructions: "
             f"{_isa()}. SmolLM2-135M-Instruct, chatterbot rows grouped by length, batch {args.batch_size}, max_len "
             f"{args.max_len}, {args.steps} steps (step 1 untimed), LoRA r=16 all-linear; {len(rounds)} rounds. "
             f"Ratios are ours / HF within a round; median (range) over rounds.", "",
             "| pairing | HF config | ours base, dropout | HF base, dropout | tokens/s ours / HF | peak RSS ours / HF "
             "| ours tok/s (median) | HF tok/s | ours RSS MiB | HF RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, hf in PAIRINGS.items():
        both = [r for r in rounds if "ours" in r and hf in r]
        if not both:
            continue
        tps = [r["ours"]["tokens_per_s"] / r[hf]["tokens_per_s"] for r in both]
        rss = [r["ours"]["peak_rss_mib"] / r[hf]["peak_rss_mib"] for r in both]

        def med(c, k, rows=both):
            return statistics.median(r[c][k] for r in rows)

        sides = [f"{both[0][c]['base_dtype']}, {both[0][c]['lora_dropout']}" for c in ("ours", hf)]
        lines.append(f"| {name} | {hf} | {sides[0]} | {sides[1]} | {_spread(tps)} | {_spread(rss)} | "
                     f"{med('ours', 'tokens_per_s'):.1f} | "
                     f"{med(hf, 'tokens_per_s'):.1f} | {med('ours', 'peak_rss_mib'):.0f} | "
                     f"{med(hf, 'peak_rss_mib'):.0f} |")  # fmt: skip
    ev = [r for r in rounds if "ours" in r and "ours_fp32" in r and r["ours"]["eval_loss_after"] is not None]
    if ev:
        rel = [r["ours"]["eval_loss_after"] / r["ours_fp32"]["eval_loss_after"] - 1 for r in ev]
        a, b = ev[0]["ours"]["eval_loss_after"], ev[0]["ours_fp32"]["eval_loss_after"]
        lines += ["", f"Eval loss after {args.steps} steps ({args.eval_size} held-out examples): default run "
                  f"{a:.4f} vs fp32 run (--base_dtype fp32 --no-chunked_ce) {b:.4f}: relative difference "
                  f"{', '.join(f'{100 * x:+.2f}%' for x in rel)} over rounds."]  # fmt: skip
        tps = [r["ours"]["tokens_per_s"] / r["ours_fp32"]["tokens_per_s"] for r in ev]
        lines.append(f"Default over fp32 run, tokens/s: {_spread(tps)}.")
    setup = next((r["ours"].get("setup_line") for r in rounds if "ours" in r), None)
    if setup:
        lines += ["", f"Our setup line: `{setup}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval_size", type=int, default=48)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    ap.add_argument("--model_dir", default=os.path.join(tempfile.gettempdir(), "lora-kernels-smollm2-hf"))
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lora-kernels-sft-vs-hf"))
    ap.add_argument("--child", choices=CONFIGS)
    ap.add_argument("--no_write", action="store_true", help="print only (no CSV / summary file)")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.child:
        res = child_ours(args) if args.child.startswith("ours") else child_hf(args)
        print("RESULT " + json.dumps(res))
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; expected a subset of {CONFIGS}")
    _export_model(Path(args.model_dir))
    rounds = []
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs) :] + configs[: rnd % len(configs)]  # rotate who runs first
        rounds.append({})
        for config in order:
            t0 = time.time()
            res = rounds[-1][config] = _run_child(args, config)
            print(f"round {rnd + 1} {config}: {res['tokens_per_s']:.1f} tokens/s, peak RSS "
                  f"{res['peak_rss_mib']:.0f} MiB, eval {res['eval_loss_after']} ({time.time() - t0:.0f} s, load "
                  f"{res['load_avg_1m']})", flush=True)  # fmt: skip
            if not args.no_write:
                _write_row(args, rnd + 1, config, res)
    text = summarise(rounds, args)
    print(text)
    if not args.no_write:
        RESULTS.with_name(f"{RESULTS.stem}_{_isa()}.md").write_text(text)


if __name__ == "__main__":
    main()
