"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

    layer i attention:  softmax(q [K_prefix,i ; K]^T) [V_prefix,i ; V]      prefix = n trained positions

The prefix reaches every layer as past key/values (see :mod:`peftkit.methods.prompt_learning.prefix`);
with ``prefix_projection`` it is computed by a small MLP from n embeddings while training.
"""

from __future__ import annotations

from torch import nn

from peftkit.methods.prefix_tuning.config import PrefixTuningConfig
from peftkit.methods.prefix_tuning.layer import PrefixEncoder
from peftkit.methods.prompt_learning.prefix import PrefixModel


class PrefixTuningModel(PrefixModel):
    method_name = "prefix tuning"
    config_cls = PrefixTuningConfig

    def build_encoder(self, config: PrefixTuningConfig, embeddings: nn.Embedding) -> nn.Module:
        return PrefixEncoder(config, device=embeddings.weight.device)
