"""The ``torch`` backend: the fused LoRA linear in plain PyTorch (``lora.py``). CPU path, fallback and test oracle."""
