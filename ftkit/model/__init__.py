"""DiffusionGemma itself: its structure (arch), loading, LoRA, quantization, checkpointing, version compat."""
