"""What the soft-prompt methods share: config base, model wrapper, prefix machinery (no method here)."""

from __future__ import annotations

from peftkit.methods.prompt_learning.config import PromptLearningConfig
from peftkit.methods.prompt_learning.model import PromptLearningModel, word_embeddings
from peftkit.methods.prompt_learning.prefix import PrefixModel

__all__ = ["PrefixModel", "PromptLearningConfig", "PromptLearningModel", "word_embeddings"]
