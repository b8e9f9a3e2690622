"""``python -m lora_kernels <command>`` (and ``torchrun ... -m lora_kernels sft``): same as ``lora-kernels``."""

import sys

from lora_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
