"""qflash: QLoRA fine-tuning with FlashAttention and packed sequences."""

__version__ = "0.1.0"
