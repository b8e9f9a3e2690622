"""``python -m lora_kernels.sft [--config FILE] [--FIELD VALUE ...]``: same as ``lora-kernels sft``."""

import sys

from lora_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
