"""kolora: LoRA / QLoRA fine-tuning of small language models on a laptop CPU or one 8 GB GPU — Korean first."""

__version__ = "0.1.0"
