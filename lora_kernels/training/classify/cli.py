"""``lora-kernels compare [--quick] ...`` (also ``python -m lora_kernels compare``), through :func:`main`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "runs/compare"
PROG = "lora-kernels compare"


def build_parser(prog: str = "lora-kernels") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Sequence-classification fine-tuning: compare methods.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare",
        help="full fine-tuning vs subspace vs LoRA (two ranks) on one task and budget, over several seeds; "
        "writes .md/.csv/.png/.json",
    )
    add_compare_args(c)
    return p


def add_compare_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--quick", action="store_true", help="tiny subset and budget, 2 seeds: seconds (smoke test)")
    c.add_argument("--task", choices=["bbc_news", "synthetic"], default=None, help="default: bbc_news")
    c.add_argument("--config", default=None, help="YAML file overriding the defaults (see classify/config.py)")
    c.add_argument("--out-dir", default=DEFAULT_OUT, help="where the artefacts go (default: %(default)s)")
    c.add_argument("--prefix", default=None, help="artefact file stem (default: compare_<task or file>[_quick])")
    c.add_argument("--methods", nargs="+", default=None, help="run only these method names from the config")
    c.add_argument("--seeds", type=int, default=None, help="runs per method, seeds 0..N-1 (default 3; --quick: 2)")
    c.add_argument("--model", default=None, help="minilm (default), tiny-bert (random, tests) or a model directory")
    c.add_argument("--max-steps", type=int, default=None, help="optimiser steps per run (default: one epoch)")
    c.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    c.add_argument("--device", default=None, help="cpu (default) or cuda")
    d = c.add_argument_group("your data (--data FILE)")
    d.add_argument("--data", default=None, help='JSONL ({"text": ..., "label": ...} per line) or CSV with a header')
    d.add_argument("--data-format", choices=["auto", "jsonl", "csv"], default=None, help="default: from the extension")
    d.add_argument("--text-field", default=None, help="field/column holding the text (default: text)")
    d.add_argument("--label-field", default=None, help="field/column holding the label (default: label)")
    d.add_argument("--split-field", default=None, help="optional field/column with train/test (default: split)")
    d.add_argument("--test-fraction", type=float, default=None, help="stratified split without one (default 0.2)")
    d.add_argument("--split-seed", type=int, default=None, help="seed of that split (default 0)")
    d.add_argument("--encoding", default=None, help="the file's text encoding (default: utf-8)")


_TOP = ("data", "data_format", "text_field", "label_field", "split_field", "test_fraction", "split_seed", "encoding")


def overrides_from(args: argparse.Namespace) -> dict:
    """The command-line values that were given, as a config override."""
    out = {k: getattr(args, k) for k in (*_TOP, "seeds", "model", "threads", "device") if getattr(args, k) is not None}
    if args.max_steps is not None:
        out["train"] = {"max_steps": args.max_steps}
    return out


def compare_main(args: argparse.Namespace) -> int:
    from .compare import load_config, run_compare
    from .config import ConfigError
    from .files import DataFileError

    try:
        cfg = load_config(args.config, quick=args.quick, task=args.task, overrides=overrides_from(args))
        stem = Path(cfg["data"]).stem if cfg["task"] == "file" else cfg["task"]
        prefix = args.prefix or f"compare_{stem}" + ("_quick" if args.quick else "")
        run_compare(cfg, args.out_dir, prefix=prefix, only=args.methods)
    except (ConfigError, DataFileError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point. ``argv`` excludes the program name; ``["compare", "--quick"]`` runs the smoke comparison."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "compare":
        return compare_main(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands before this
