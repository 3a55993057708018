"""P-tuning (Liu et al., 2021, "GPT Understands, Too").

    e1 .. en  ->  prompt encoder (MLP or biLSTM)  ->  [P1 .. Pn | x1 .. xL]  ->  frozen model

Like prompt tuning, but the prompt vectors are the output of a small network over trained
embeddings (a reparameterization that makes training more stable). PEFT calls it
``PromptEncoderConfig`` with peft_type ``P_TUNING``.
"""

from __future__ import annotations

from torch import nn

from peftkit.methods.p_tuning.config import PromptEncoderConfig
from peftkit.methods.p_tuning.layer import PromptEncoder
from peftkit.methods.prompt_learning.model import PromptLearningModel


class PTuningModel(PromptLearningModel):
    method_name = "P-tuning"
    config_cls = PromptEncoderConfig

    def build_encoder(self, config: PromptEncoderConfig, embeddings: nn.Embedding) -> nn.Module:
        return PromptEncoder(config, device=embeddings.weight.device)
