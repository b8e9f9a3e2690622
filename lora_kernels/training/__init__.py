"""Training on top of the layers: memory tools (``memory``: checkpointing, casting, peak memory), chunked
cross-entropy (``losses``), multi-process helpers (``distributed``), the SFT loop (``sft``) and the
classification comparison (``classify``)."""
