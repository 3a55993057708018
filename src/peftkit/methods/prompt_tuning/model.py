"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

    [P1 .. Pn | x1 .. xL]  ->  frozen model          P = trained rows of PromptEmbedding

Only the n prompt vectors are trained; everything else (forward, generation, files) is the
shared soft-prompt machinery of :mod:`peftkit.methods.prompt_learning`.
"""

from __future__ import annotations

from torch import nn

from peftkit.methods.prompt_learning.model import PromptLearningModel
from peftkit.methods.prompt_tuning.config import PromptTuningConfig
from peftkit.methods.prompt_tuning.layer import PromptEmbedding


class PromptTuningModel(PromptLearningModel):
    method_name = "prompt tuning"
    config_cls = PromptTuningConfig

    def build_encoder(self, config: PromptTuningConfig, embeddings: nn.Embedding) -> nn.Module:
        return PromptEmbedding(config, embeddings)
