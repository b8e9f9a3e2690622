"""``lora-kernels`` console script. Subcommands: ``sft`` (supervised fine-tuning, see ``lora_kernels.training.sft``) and
``compare`` (full fine-tuning vs subspace vs LoRA on text classification, see ``lora_kernels.training.classify``)."""

from __future__ import annotations

import sys

USAGE = """usage: lora-kernels <command> [options]

commands:
  sft       supervised fine-tuning (LoRA or full) of a causal LM; `lora-kernels sft --help` lists every option
  compare   full fine-tuning vs subspace vs LoRA on BBC News (MiniLM-L6); `lora-kernels compare --help`
"""


def _sft(argv: list[str]) -> int:
    from lora_kernels.training.sft.config import ConfigError, config_from_argv, help_text

    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    from lora_kernels.models import ModelError
    from lora_kernels.training.sft.checkpoint import CheckpointError
    from lora_kernels.training.sft.data import DataError

    code = 0
    try:
        cfg = config_from_argv(argv)
        from lora_kernels.training.sft.loop import run_sft

        run_sft(cfg)
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        print(f"lora-kernels sft: error: {e}", file=sys.stderr)
        code = 2
    from lora_kernels.training import distributed

    if distributed.launched_by_torchrun():
        distributed.exit_worker(code)  # a finished gloo worker can abort in interpreter shutdown (see there)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "sft":
        return _sft(rest)
    if cmd == "compare":
        from lora_kernels.training.classify.cli import main as classify_main

        return classify_main(["compare", *rest])
    print(f"lora-kernels: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
