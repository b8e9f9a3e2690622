"""Backend implementations of the fused LoRA linear op (torch here; triton and cuda in their own packages)."""
