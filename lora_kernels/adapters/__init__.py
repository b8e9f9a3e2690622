"""PEFT support: injecting adapters into a model by module-name patterns (``inject``), the adapter configs
(``config``), and adapter files in PEFT's format (``io``)."""
