"""QLoRA on the CPU, the default SFT run three ways: ``lora-kernels sft --base_dtype nf4``, ``lora-kernels sft``
(fp32 base; ``--base_dtype bf16`` with ``--with_bf16``), and Hugging Face ``Trainer`` + ``peft`` on the same model
loaded 4-bit by bitsandbytes (``BitsAndBytesConfig(load_in_4bit, nf4, double quant)``, the QLoRA recipe).

Same everything: SmolLM2-135M-Instruct (the GGUF de-quantised to fp32, exported once to a safetensors folder for
the HF side; 4-bit by the same bitsandbytes quantizer on both 4-bit sides, so the same codes), the default config's
data, rows and step order (our sampler feeds HF's batches), LoRA r=16 alpha=32 all-linear dropout 0, AdamW, our
warmup + cosine schedule (passed to Trainer as its scheduler), clipping, 80 steps of 8 rows; both 4-bit sides
compute in the dtype ours picks here (bf16 on a CPU with bf16 instructions). Each run is its own process under
``/usr/bin/time -v`` (peak RSS = its "Maximum resident set size").

* tokens/s: the non-padding input tokens of steps 2..80 over their wall time (step 1 is warm-up), all sides;
* eval loss: mean token loss on the default run's 96 held-out examples after training. Ours: its own evaluation.
  HF: the same rows, batches and loss sum (lora_kernels' ``collate`` + ``compute_loss_sum``) with the model left in
  training mode under ``no_grad`` (dropout is 0, so the same function): in eval mode on an AVX512-BF16 CPU
  bitsandbytes switches its 4-bit layers to a bf16 inference kernel, which would change the numbers;
* base weights: bytes of the 4-bit linear weights with their quant state against the same weights in bf16.

Rows are appended to ``benchmarks/results/qlora_cpu.csv`` with ``uptime``'s load. Run it under
``flock /tmp/lk-bench.lock`` (one benchmark at a time on the shared machine)::

    flock /tmp/lk-bench.lock python benchmarks/qlora_cpu.py [--rounds 1] [--with_bf16]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "qlora_cpu.csv"
COLUMNS = ["time_utc", "round", "impl", "base", "steps", "batch_size", "threads", "tokens_per_s", "peak_rss_mib",
           "eval_loss_before", "eval_loss_after", "eval_loss_vs_ours_fp32", "base_weight_mib", "base_weight_vs_bf16",
           "wall_s", "load_before", "compute", "torch", "transformers", "peft", "bitsandbytes"]  # fmt: skip


def _timed_tokens_per_s(step_tokens: list[int], step_times: list[float]) -> float:
    return sum(step_tokens[1:]) / sum(step_times[1:])


def child_hf(args) -> dict:
    """Trainer + peft on the bitsandbytes 4-bit model, fed our default run's batches; prints RESULT json."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,  # fmt: skip
    )

    from lora_kernels.quant.convert import base_weight_bytes
    from lora_kernels.training.sft.config import build_config
    from lora_kernels.training.sft.data import collate, ensure_chat_template, prepare_data
    from lora_kernels.training.sft.evaluation import compute_loss_sum
    from lora_kernels.training.sft.runtime import lr_lambda, param_groups
    from lora_kernels.training.sft.sampler import StepSampler, row_lengths

    # the default run, at dropout 0 on every side (HF's eval runs in training mode: module docstring)
    cfg = build_config(overrides={"lora_dropout": 0.0, **({"max_steps": args.max_steps} if args.max_steps else {})})
    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    ensure_chat_template(tok, log=lambda *_: None)
    data = prepare_data(cfg, tok, log=lambda *_: None)
    sampler = StepSampler(len(data.train_rows), cfg.batch_size, cfg.seed, row_lengths(data, cfg))
    rows = [data.train_rows[i][0] for s in range(cfg.max_steps) for i in sampler.rows(s)[1]]
    dt = _compute_dtype()  # the compute dtype ours picks here: equal settings
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dt)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, dtype=dt,
                                                 quantization_config=bnb_cfg, device_map="cpu")  # fmt: skip
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    b4, b16 = base_weight_bytes(model)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    pad = tok.pad_token_id

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i].input_ids, "labels": rows[i].labels}

    def pad_batch(items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for b, x in enumerate(items):
            n = len(x["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.max_steps))
    targs = TrainingArguments(output_dir=os.path.join(args.out, "hf"), per_device_train_batch_size=cfg.batch_size,
                              max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm, logging_steps=1,
                              save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                              dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed)  # fmt: skip
    trainer = SequentialTrainer(model=model, args=targs, train_dataset=Rows(), data_collator=pad_batch,
                                callbacks=[Timer()], optimizers=(opt, sched))  # fmt: skip
    trainer.train()
    step_tokens = [
        sum(len(r) for r in rows[s * cfg.batch_size : (s + 1) * cfg.batch_size]) for s in range(cfg.max_steps)
    ]
    total = count = 0.0
    order = sorted(range(len(data.eval_rows)), key=lambda i: -sum(len(ex) for ex in data.eval_rows[i]))
    with torch.no_grad():  # training mode, dropout 0: module docstring
        for i in range(0, len(order), cfg.eval_batch_size):
            batch = collate([data.eval_rows[j] for j in order[i : i + cfg.eval_batch_size]], pad)
            total += float(compute_loss_sum(model, batch))
            count += batch["n_targets"]
    return {"tokens_per_s": _timed_tokens_per_s(step_tokens, step_times), "eval_loss_after": total / count,
            "eval_loss_before": None, "base_bytes": b4, "base_bytes_bf16": b16}  # fmt: skip


def _ours_result(run_dir: Path, stdout: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    out = {"tokens_per_s": _timed_tokens_per_s([r["tokens"] for r in train], [r["step_time_s"] for r in train]),
           "eval_loss_after": summary["eval_loss_after"], "eval_loss_before": summary["eval_loss_before"],
           "base_bytes": None, "base_bytes_bf16": None}  # fmt: skip
    m = re.search(r"frozen base -> \S+.*?([\d.]+) MiB in bf16 -> ([\d.]+) MiB", stdout)
    if m:  # the quantization report of the nf4 run (lora_kernels.quant.convert.QuantReport)
        out["base_bytes"], out["base_bytes_bf16"] = float(m.group(2)) * 2**20, float(m.group(1)) * 2**20
    return out


def _run(cmd: list[str]) -> tuple[str, float, float]:
    """``(stdout, peak RSS MiB, wall s)`` of ``cmd`` under ``/usr/bin/time -v``."""
    t0 = time.time()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-8000:])
        raise SystemExit(f"{cmd} failed with exit status {out.returncode}")
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return out.stdout, kib / 1024, time.time() - t0


def _one(impl: str, args, rnd: int) -> dict:
    if impl == "hf_trainer+peft+bnb4bit":
        stdout, rss, wall = _run([sys.executable, __file__, "--child", "hf", "--model_dir", args.model_dir,
                                  "--out", args.out, "--max_steps", str(args.max_steps or 0)])  # fmt: skip
        res = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT ") :])
    else:
        base = impl.split("_")[-1]
        name = f"{base}-r{rnd}"
        stdout, rss, wall = _run([sys.executable, "-m", "lora_kernels", "sft", "--base_dtype", base, "--output_dir",
                                  args.out, "--name", name, "--overwrite", "true", "--progress", "false",
                                  "--lora_dropout", "0",
                                  *(["--max_steps", str(args.max_steps)] if args.max_steps else [])])  # fmt: skip
        res = _ours_result(Path(args.out) / name, stdout)
    res.update(peak_rss_mib=rss, wall_s=wall)
    print(impl, {k: v for k, v in res.items()}, flush=True)
    return res


def _compute_name() -> str:
    """What ``lora-kernels sft --base_dtype nf4`` computes in on this machine (bf16 where the CPU has bf16
    instructions: lora_kernels.training.sft.runtime.resolve_quant_compute)."""
    import torch

    from lora_kernels.training.sft.config import build_config
    from lora_kernels.training.sft.runtime import resolve_quant_compute

    return resolve_quant_compute(build_config(overrides={"base_dtype": "nf4"}), torch.device("cpu"))[0]


def _compute_dtype():
    import torch

    return torch.bfloat16 if _compute_name() == "bf16" else torch.float32


def _versions() -> list[str]:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return [torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--with_bf16", action="store_true", help="also run ours with --base_dtype bf16")
    ap.add_argument("--model_dir", default=os.path.join(tempfile.gettempdir(), "lora-kernels-smollm2-hf"))
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lora-kernels-qlora-cpu"))
    ap.add_argument("--max_steps", type=int, default=0, help="0: the default run's 80 (a smaller value: smoke test)")
    ap.add_argument("--csv", default=str(RESULTS))
    ap.add_argument("--child", choices=["hf"])
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child_hf(args)), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.sft_vs_hf import _export_model  # the same exported folder as benchmarks/sft_vs_hf.py

    _export_model(Path(args.model_dir))
    impls = ["ours_nf4", "ours_fp32", "hf_trainer+peft+bnb4bit"] + (["ours_bf16"] if args.with_bf16 else [])
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for rnd in range(args.rounds):
            order = impls if rnd % 2 == 0 else impls[::-1]  # interleaved: alternate the order between rounds
            results = {}
            for impl in order:
                load = os.getloadavg()[0]
                results[impl] = r = _one(impl, args, rnd)
                r["load"] = load
            fp32 = results["ours_fp32"]["eval_loss_after"]
            compute = _compute_name()  # of the 4-bit runs
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for impl in impls:
                r = results[impl]
                mib = r["base_bytes"] / 2**20 if r["base_bytes"] else None
                ratio = r["base_bytes"] / r["base_bytes_bf16"] if r["base_bytes"] else None
                w.writerow([now, rnd, impl, "nf4" if "nf4" in impl or "bnb" in impl else impl.split("_")[-1],
                            args.max_steps or 80, 8,
                            os.cpu_count(), round(r["tokens_per_s"], 1), round(r["peak_rss_mib"], 1),
                            r["eval_loss_before"], round(r["eval_loss_after"], 4),
                            round(r["eval_loss_after"] / fp32, 4), None if mib is None else round(mib, 2),
                            None if ratio is None else round(ratio, 3), round(r["wall_s"], 1), round(r["load"], 2),
                            compute if r["base_bytes"] else None, *_versions()])  # fmt: skip
            f.flush()


if __name__ == "__main__":
    main()
