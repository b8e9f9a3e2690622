"""``python -m lora_kernels.training.classify compare [--quick] ...`` (also ``lora-kernels compare`` via :func:`main`)."""

from __future__ import annotations

import argparse
import sys


def build_parser(prog: str = "python -m lora_kernels.training.classify") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Sequence-classification fine-tuning: compare methods.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare",
        help="full fine-tuning vs subspace vs LoRA (two ranks) on one task and budget; writes .md/.csv/.png/.json",
    )
    add_compare_args(c)
    return p


def add_compare_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--quick", action="store_true", help="tiny subset and budget: runs in seconds (smoke test)")
    c.add_argument("--task", choices=["bbc_news", "synthetic"], default=None, help="default: bbc_news")
    c.add_argument("--config", default=None, help="YAML file overriding the defaults (see compare.DEFAULT)")
    c.add_argument("--out-dir", default="benchmarks/results", help="where the artefacts go (default: %(default)s)")
    c.add_argument("--prefix", default=None, help="artefact file stem (default: compare_<task>[_quick])")
    c.add_argument("--methods", nargs="+", default=None, help="run only these method names from the config")
    c.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    c.add_argument("--device", default=None, help="cpu (default) or cuda")


def compare_main(args: argparse.Namespace) -> int:
    from .compare import load_config, run_compare

    cfg = load_config(args.config, quick=args.quick, task=args.task)
    if args.threads is not None:
        cfg["threads"] = args.threads
    if args.device is not None:
        cfg["device"] = args.device
    prefix = args.prefix or f"compare_{cfg['task']}" + ("_quick" if args.quick else "")
    run_compare(cfg, args.out_dir, prefix=prefix, only=args.methods)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point. ``argv`` excludes the program name; ``["compare", "--quick"]`` runs the smoke comparison."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "compare":
        return compare_main(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands before this
