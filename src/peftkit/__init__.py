"""peftkit: fine-tune transformer models with full fine-tuning and parameter-efficient methods."""

__version__ = "0.1.0"
