"""4-bit frozen bases (QLoRA): bitsandbytes' NF4 / FP4 weights under the fused LoRA op.

``nf4``: recognise and describe a ``bitsandbytes.nn.Params4bit`` (no copy), its torch dequantization
(bit-identical to bitsandbytes, by row ranges). ``convert``: quantize a model's linear layers at load with
bitsandbytes' quantizer (an ordinary Hugging Face 4-bit model), prepare a ``Linear4bit`` for wrapping, and the
merge that re-quantizes like PEFT. Importing this package imports neither bitsandbytes nor transformers.
"""

from .nf4 import QuantWeight4bit, dequantize, dequantize_rows, describe, is_4bit, is_params4bit

__all__ = ["QuantWeight4bit", "describe", "dequantize", "dequantize_rows", "is_4bit", "is_params4bit"]
