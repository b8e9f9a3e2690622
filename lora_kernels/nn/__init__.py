"""Drop-in layers: ``LoRALinear`` (an ``nn.Linear`` with a LoRA adapter) and ``SubspaceLinear`` (LoRA with a
frozen SVD basis and a trainable ``r x r`` core), both computed by the fused op ``lora_kernels.lora_linear``."""

from .lora import LoRALinear
from .subspace import SubspaceLinear

__all__ = ["LoRALinear", "SubspaceLinear"]
